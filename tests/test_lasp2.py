"""LASP-2 exactness (DESIGN invariant 1), communication volume and bad input.

Reference: the naive per-token recurrence (or explicit quadratic form) over the whole sequence.
Tolerances: fp64 in-process simulation <= 1e-10 relative (only reassociation of sums differs);
fp32 over gloo <= 1e-5 relative, for the output and every gradient (q, k, v, log_decay).
"""

from __future__ import annotations

import pytest
import torch

from parallel import comm
from parallel.lasp2 import lasp2_attention, rank_spans
from tests.distributed import RankFailure, run_on_ranks
from tests.sp_sim import (
    DK,
    DV,
    GLOO_CASES,
    H,
    gather_full,
    make_inputs,
    reference,
    rel_err,
    run_linear_sp_rank,
    simulate_lasp2,
)

FP64_TOL = 1e-10
FP32_TOL = 1e-5


DOCS = ["none", "inside", "on_cut", "span3", "mixed"]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("docs", DOCS)
@pytest.mark.parametrize("W,T", [(1, 5), (2, 5), (3, 9), (4, 1), (4, 3), (7, 2)], ids=lambda x: str(x))
def test_simulated_ranks_match_reference_fp64(W, T, docs, decay, causal):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs)
    got = simulate_lasp2(q, k, v, a, cu, W=W, causal=causal, do=do, chunk_size=4)
    want = reference(q, k, v, a, cu, do, causal)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], got, want):
        if y is None:
            assert x is None, name
            continue
        assert rel_err(x, y) <= FP64_TOL, f"{name}: {rel_err(x, y):.2e}"


# ---------------------------------------------------------------------------------------------
# Real gloo processes, fp32.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("decay,docs,causal", GLOO_CASES)
def test_gloo_ranks_match_reference_fp32(W, decay, docs, causal):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    T = 6
    results = run_on_ranks(W, run_linear_sp_rank, "lasp2", T, decay, docs, causal, seed=1)
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=1)
    want = reference(q, k, v, a, cu, do, causal)
    got = gather_full(results, a)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], got, want):
        if y is None:
            continue
        assert x.dtype == torch.float32
        assert rel_err(x.double(), y) <= FP32_TOL, f"{name}: {rel_err(x.double(), y):.2e}"


# ---------------------------------------------------------------------------------------------
# Communication volume: (W-1) * payload per rank each way, independent of T.
# ---------------------------------------------------------------------------------------------


def lasp2_bytes(W: int, B: int, decay: str, causal: bool, docs: str) -> int:
    """Analytic all-gather bytes sent (= received) per rank per call, forward + backward, fp32."""
    state = B * H * DK * DV
    two_states = not causal and (decay != "none" or docs != "none")
    forward = state * (2 if two_states else 1) + (B * H if decay == "token" else 0)
    backward = state * (1 if causal else 2)
    return (W - 1) * (forward + backward) * 4


# the public function's agreement check gathers 12 int64 per rank (flag + 11 fingerprint fields)
AGREEMENT_BYTES = 12 * 8


@pytest.mark.parametrize(
    "decay,docs,causal",
    [("none", "none", True), ("token", "inside", True), ("head", "none", False), ("token", "mixed", False)],
)
def test_lasp2_bytes_are_analytic_and_independent_of_length(decay, docs, causal):
    """In context (the runtime's path): one state all-gather forward, one backward. The public
    function adds its agreement all-gather."""
    W = 4
    B = 1 if docs != "none" else 2
    for T in (4, 64):
        for in_context, calls, extra in ((True, 2, 0), (False, 3, (W - 1) * AGREEMENT_BYTES)):
            results = run_on_ranks(W, run_linear_sp_rank, "lasp2", T, decay, docs, causal, 2, in_context)
            for _, summary in results:
                assert set(summary) == {"all_gather"}
                counts = summary["all_gather"]
                assert counts["calls"] == calls
                expected = lasp2_bytes(W, B, decay, causal, docs) + extra
                assert counts["bytes_sent"] == counts["bytes_received"] == expected


def test_context_entry_matches_reference():
    W, T, decay, docs, causal = 3, 5, "token", "mixed", False
    results = run_on_ranks(W, run_linear_sp_rank, "lasp2", T, decay, docs, causal, 3, True)
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=3)
    want = reference(q, k, v, a, cu, do, causal)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], gather_full(results, a), want):
        assert rel_err(x.double(), y) <= FP32_TOL, f"{name}: {rel_err(x.double(), y):.2e}"


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def _run_with_rank_dependent_documents(ctx):
    q = torch.randn(1, 4, H, DK)
    cu = torch.tensor([0, 3 + ctx.rank, 8])  # differs across ranks
    try:
        lasp2_attention(q, q, torch.randn(1, 4, H, DV), group=ctx.world, cu_seqlens=cu)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_documents_across_ranks_raise_on_every_rank():
    messages = run_on_ranks(2, _run_with_rank_dependent_documents)
    assert all(m is not None and "disagree on cu_seqlens checksum" in m for m in messages), messages


def _run_positive_decay(ctx):
    q = torch.randn(1, 4, H, DK)
    lasp2_attention(q, q, torch.randn(1, 4, H, DV), group=ctx.world, log_decay=torch.tensor([0.1, -0.1]))


def test_positive_decay_is_rejected_before_any_state_travels():
    with pytest.raises(RankFailure, match="log_decay"):
        run_on_ranks(2, _run_positive_decay)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"cu_seqlens": torch.tensor([0, 3, 7])}, "end at the packed length"),
        ({"cu_seqlens": torch.tensor([1, 8])}, "start at 0"),
        ({"cu_seqlens": torch.tensor([0, 4, 4, 8])}, "strictly increasing"),
        ({"cu_seqlens": torch.tensor([0.0, 8.0])}, "1-D integer"),
    ],
)
def test_bad_cu_seqlens(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        rank_spans(kwargs["cu_seqlens"], num_ranks=2, rank=0, local_len=4)


def test_bad_shapes_name_the_argument():
    q = torch.randn(1, 4, H, DK)
    with pytest.raises(ValueError, match="v"):
        lasp2_attention(q, q, torch.randn(1, 5, H, DV), group=comm.SOLO)
    with pytest.raises(ValueError, match="batch size 1"):
        x = torch.randn(2, 4, H, DK)
        lasp2_attention(x, x, torch.randn(2, 4, H, DV), group=comm.SOLO, cu_seqlens=torch.tensor([0, 2, 4]))


def test_single_rank_respects_no_grad():
    q = torch.randn(1, 5, H, DK, requires_grad=True)
    with torch.no_grad():
        o = lasp2_attention(q, q, torch.randn(1, 5, H, DV), group=comm.SOLO)
    assert not o.requires_grad
