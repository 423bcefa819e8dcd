"""The pipelined state scan (parallel/scan.py) for linear attention and the gated delta rule:
exactness over gloo (fp32, <= 1e-5 relative, output and every gradient) and communication
volumes asserted exactly with CommMeter for the scan, LASP-2's all-gather and the LASP-1 ring."""

from __future__ import annotations

import pytest
import torch

from parallel import comm
from parallel.lasp2 import lasp2_attention
from parallel.ring import lasp1_attention
from parallel.scan import scan_attention
from tests import delta_cases
from tests.delta_cases import gather_grads, make_delta_inputs
from tests.distributed import run_on_ranks
from tests.sp_sim import DK, DV, GLOO_CASES, H, gather_full, make_inputs, reference, rel_err, shard
from tests.test_lasp2_delta import assert_matches, run_delta_sp_rank

FP32_TOL = 1e-5


def run_linear_rank(ctx, op_name: str, T: int, decay: str, docs: str, causal: bool, seed: int, pieces: int = 2):
    ops = {
        "scan": lambda *a, **kw: scan_attention(*a, pieces=pieces, check_documents=False, **kw),
        "lasp2": lasp2_attention,
        "lasp1": lambda *a, **kw: lasp1_attention(*a, check_documents=False, **kw),
    }
    W, r = ctx.world_size, ctx.rank
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=seed)
    leaves = [None if x is None else shard(x, W, r).clone().requires_grad_() for x in (q, k, v, a)]
    with comm.CommMeter() as meter:
        o = ops[op_name](*leaves[:3], group=ctx.world, causal=causal, log_decay=leaves[3], cu_seqlens=cu)
        o.backward(shard(do, W, r))
    return [o.detach()] + [None if x is None else x.grad for x in leaves], meter.summary()


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("decay,docs,causal", GLOO_CASES)
def test_linear_scan_matches_reference_fp32(W, decay, docs, causal):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    T = 6
    results = run_on_ranks(W, run_linear_rank, "scan", T, decay, docs, causal, seed=1)
    q, k, v, a, cu, do = make_inputs(W, T, decay, docs, dtype=torch.float32, seed=1)
    want = reference(q, k, v, a, cu, do, causal)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], gather_full(results, a), want):
        if y is not None:
            assert rel_err(x.double(), y) <= FP32_TOL, f"{name}: {rel_err(x.double(), y):.2e}"


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("decay,docs", delta_cases.GLOO_CASES)
def test_delta_scan_matches_reference_fp32(W, decay, docs):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    T = 6
    results = run_on_ranks(W, run_delta_sp_rank, "scan", T, decay, docs, seed=1)
    q, k, v, beta, a, cu, do = make_delta_inputs(W, T, decay, docs, dtype=torch.float32, seed=1)
    assert_matches(
        gather_grads([r for r, _ in results], a), delta_cases.delta_reference(q, k, v, beta, a, cu, do), FP32_TOL
    )


# ---------------------------------------------------------------------------------------------
# Volumes, per rank r of W, causal, forward + backward, fp32 (4 bytes), state n = B*H*dk*dv:
#   scan / ring: send n to r+1 (forward) and n to r-1 (backward): ranks 0 and W-1 send one state,
#                the others two; the same for receives. The scan cuts each state into pieces.
#   LASP-2:      all-gather of (W-1) states forward (+ 8-byte fingerprint) and backward.
# ---------------------------------------------------------------------------------------------


def chain_bytes(W: int, r: int, state_bytes: int) -> int:
    return state_bytes * ((r + 1 < W) + (r > 0))


@pytest.mark.parametrize("W", [3, 4])
def test_linear_volumes_scan_ring_allgather(W):
    T, B = 5, 2
    n = B * H * DK * DV * 4
    per_op = {
        op: run_on_ranks(W, run_linear_rank, op, T, "head", "none", True, seed=3) for op in ("scan", "lasp1", "lasp2")
    }
    for r in range(W):
        scan, ring, gather = (per_op[op][r][1] for op in ("scan", "lasp1", "lasp2"))
        assert set(scan) <= {"send", "recv"} and set(ring) <= {"send", "recv"}
        for meter in (scan, ring):
            assert meter["send"]["bytes_sent"] == chain_bytes(W, r, n)
            assert meter["recv"]["bytes_received"] == chain_bytes(W, r, n)
        # the scan sends each state in 2 pieces (H = 2 heads), the ring in one message
        assert scan["send"]["calls"] == 2 * ring["send"]["calls"]
        # public function: the agreement all-gather (12 int64) and the state gathers
        assert gather["all_gather"]["bytes_sent"] == gather["all_gather"]["bytes_received"] == (W - 1) * (2 * n + 96)


@pytest.mark.parametrize("W", [3, 4])
def test_delta_volumes_scan_vs_allgather(W):
    T, B = 5, 2
    state, transition = B * H * DK * DV * 4, B * H * DK * DK * 4
    # the runtime's entries (SPContext built beforehand): no agreement all-gather
    scan = run_on_ranks(W, run_delta_sp_rank, "scan", T, "token", "none", 3, 4, True)
    gather = run_on_ranks(W, run_delta_sp_rank, "lasp2", T, "token", "none", 3, 4, True)
    for r in range(W):
        s, g = scan[r][1], gather[r][1]
        assert set(s) <= {"send", "recv"}
        assert s["send"]["bytes_sent"] == chain_bytes(W, r, state)  # no transition travels
        assert s["recv"]["bytes_received"] == chain_bytes(W, r, state)
        assert g["all_gather"]["bytes_sent"] == (W - 1) * (state + transition + state)


def test_scan_rejects_mismatched_documents():
    messages = run_on_ranks(2, _run_scan_with_rank_dependent_documents)
    assert all(m is not None and "disagree on cu_seqlens checksum" in m for m in messages), messages


def _run_scan_with_rank_dependent_documents(ctx):
    q = torch.randn(1, 4, H, DK)
    try:
        scan_attention(q, q, torch.randn(1, 4, H, DV), group=ctx.world, cu_seqlens=torch.tensor([0, 3 + ctx.rank, 8]))
    except ValueError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_seven_gloo_ranks_scan_and_allgather_match_reference_fp32():
    """W = 7 (not a power of two, longer chains) for both layer types, documents anywhere."""
    W, T = 7, 3
    results = run_on_ranks(W, run_linear_rank, "scan", T, "token", "mixed", True, seed=4)
    q, k, v, a, cu, do = make_inputs(W, T, "token", "mixed", dtype=torch.float32, seed=4)
    want = reference(q, k, v, a, cu, do, True)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], gather_full(results, a), want):
        assert rel_err(x.double(), y) <= FP32_TOL, f"{name}: {rel_err(x.double(), y):.2e}"
    q, k, v, beta, a, cu, do = make_delta_inputs(W, T, "token", "mixed", dtype=torch.float32, seed=4)
    want = delta_cases.delta_reference(q, k, v, beta, a, cu, do)
    for op in ("scan", "lasp2"):
        results = run_on_ranks(W, run_delta_sp_rank, op, T, "token", "mixed", seed=4)
        assert_matches(gather_grads([r for r, _ in results], a), want, FP32_TOL)
