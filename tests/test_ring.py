"""LASP-1 ring baseline: exactness over gloo (fp32 <= 1e-5 relative, output and every gradient),
its point-to-point volume, and agreement with LASP-2 on the same inputs.

The ring shares LASP-2's rank-local pieces, which the fp64 simulation in test_lasp2.py covers;
what is specific to the ring (the serial chains) only exists across processes, so it is tested
over gloo."""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.sp_sim import DK, DV, GLOO_CASES, H, gather_full, make_inputs, reference, rel_err, run_linear_sp_rank

FP32_TOL = 1e-5


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("decay,docs,causal", GLOO_CASES)
def test_ring_matches_reference_fp32(W, decay, docs, causal):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    T = 5
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=3)
    got = gather_full(run_on_ranks(W, run_linear_sp_rank, "lasp1", T, decay, docs, causal, seed=3), a)
    want = reference(q, k, v, a, cu, do, causal)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], got, want):
        if y is not None:
            assert rel_err(x.double(), y) <= FP32_TOL, f"{name}: {rel_err(x.double(), y):.2e}"


def test_ring_and_lasp2_agree():
    W, T = 4, 7
    args = (T, "token", "mixed", True)
    ring = gather_full(run_on_ranks(W, run_linear_sp_rank, "lasp1", *args, seed=4), torch.zeros(1, 1, 1))
    gather = gather_full(run_on_ranks(W, run_linear_sp_rank, "lasp2", *args, seed=4), torch.zeros(1, 1, 1))
    for x, y in zip(ring, gather):
        assert rel_err(x, y) <= FP32_TOL


@pytest.mark.parametrize("decay,docs,causal", [("none", "none", True), ("token", "inside", False)])
@pytest.mark.parametrize("in_context", [True, False], ids=["context", "public"])
def test_ring_bytes(decay, docs, causal, in_context):
    """Per rank: one state from the left and one to the right per chain (ends of the chain do
    one of the two), chains: 1 forward + 1 backward causal, twice that bidirectional; plus, in
    the public function, the agreement all-gather of 12 int64 per rank."""
    W, T = 4, 6
    B = 1 if docs != "none" else 2
    state = B * H * DK * DV * 4
    chains = 2 if causal else 4
    results = run_on_ranks(W, run_linear_sp_rank, "lasp1", T, decay, docs, causal, 5, in_context)
    for rank, (_, summary) in enumerate(results):
        neighbours = (rank > 0) + (rank < W - 1)
        # each chain sends once and receives once through a middle rank; a chain's two ends do one each
        total_hops = chains * neighbours
        sent = summary.get("send", {}).get("bytes_sent", 0)
        received = summary.get("recv", {}).get("bytes_received", 0)
        assert sent + received == total_hops * state, (rank, summary)
        if in_context:
            assert "all_gather" not in summary
        else:
            assert summary["all_gather"]["bytes_sent"] == (W - 1) * 12 * 8
