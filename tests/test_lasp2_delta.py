"""LASP-2 for the gated delta rule: exactness (DESIGN invariant 1), volumes and bad input.

Reference: the naive per-token recurrence over the whole sequence (parallel/delta_rule.py).
Tolerances: fp64 in-process simulation of W ranks through the op's own phase functions
<= 1e-10 relative; fp32 over gloo <= 1e-5 relative; output and every gradient (q, k, v,
beta, log_decay).
"""

from __future__ import annotations

import pytest
import torch

from parallel import comm, lasp2_delta
from parallel.lasp2 import lasp2_delta_rule_attention, rank_spans
from tests.delta_cases import (
    DK,
    DV,
    GLOO_CASES,
    NAMES,
    H,
    delta_reference,
    gather_grads,
    make_delta_inputs,
    shard_leaves,
)
from tests.distributed import run_on_ranks
from tests.sp_sim import rel_err, shard

FP64_TOL = 1e-10
FP32_TOL = 1e-5
DOCS = ["none", "inside", "on_cut", "span3", "mixed"]


def simulate_lasp2_delta(inputs, cu, do, *, W: int, chunk_size: int):
    """[o, dq, dk, dv, dbeta, dlog_decay] over W simulated ranks, each gather a stack."""
    T = inputs[0].shape[1] // W
    spans = [rank_spans(cu, num_ranks=W, rank=r, local_len=T) for r in range(W)]
    leaves = [shard_leaves(inputs, W, r) for r in range(W)]
    pre = [lasp2_delta.forward_pre(leaves[r], spans[r], chunk_size) for r in range(W)]
    payload_W = torch.stack([p for p, _ in pre])
    intra = [lasp2_delta.forward_intra(leaves[r], pre[r][1]) for r in range(W)]
    post = [lasp2_delta.forward_post(leaves[r], intra[r], payload_W, pre[r][1], spans[r]) for r in range(W)]
    do_r = [shard(do, W, r) for r in range(W)]
    dM_W = torch.stack([lasp2_delta.backward_pre(intra[r], do_r[r]) for r in range(W)])
    per_rank = []
    for r in range(W):
        o_r, saved_r = post[r]
        grads = lasp2_delta.backward_post(leaves[r], o_r, do_r[r], pre[r][1], dM_W, saved_r, spans[r])
        per_rank.append([o_r.detach(), *grads])
    return gather_grads(per_rank, inputs[4])


def assert_matches(got, want, tol):
    for name, x, y in zip(NAMES, got, want):
        if y is None:
            assert x is None, name
            continue
        assert rel_err(x.double(), y) <= tol, f"{name}: {rel_err(x.double(), y):.2e}"


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("docs", DOCS)
@pytest.mark.parametrize("W,T", [(1, 5), (2, 5), (3, 9), (4, 1), (4, 3), (7, 2)], ids=str)
def test_simulated_ranks_match_reference_fp64(W, T, docs, decay):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    q, k, v, beta, a, cu, do = make_delta_inputs(W, T, decay, docs)
    got = simulate_lasp2_delta((q, k, v, beta, a), cu, do, W=W, chunk_size=4)
    assert_matches(got, delta_reference(q, k, v, beta, a, cu, do), FP64_TOL)


# ---------------------------------------------------------------------------------------------
# Real gloo processes, fp32.
# ---------------------------------------------------------------------------------------------


def run_delta_sp_rank(
    ctx, op_name: str, T: int, decay: str, docs: str, seed: int, chunk_size: int = 4, in_context: bool = False
):
    """On one gloo rank: its shard through the named delta-rule SP op, forward and backward, by
    the public function or (``in_context``) by the op's SPContext entry, as the runtime calls it
    (the context built before the meter starts). Returns ([o, dq, dk, dv, dbeta, dlog_decay],
    CommMeter summary)."""
    from parallel.lasp2_delta import lasp2_delta_rule_attention_in_context
    from parallel.scan import scan_delta_rule_attention, scan_delta_rule_attention_in_context
    from parallel.sp_context import SPContext

    W, r = ctx.world_size, ctx.rank
    q, k, v, beta, a, cu, do = make_delta_inputs(W, T, decay, docs, dtype=torch.float32, seed=seed)
    leaves = shard_leaves((q, k, v, beta, a), W, r)
    if in_context:
        sp = SPContext.from_cu_seqlens(ctx.world, cu, local_len=T)
        entry = {"lasp2": lasp2_delta_rule_attention_in_context, "scan": scan_delta_rule_attention_in_context}[op_name]

        def op(*x, log_decay):
            return entry(*x, sp, log_decay=log_decay, chunk_size=chunk_size)
    else:
        public = {"lasp2": lasp2_delta_rule_attention, "scan": scan_delta_rule_attention}[op_name]

        def op(*x, log_decay):
            return public(*x, group=ctx.world, log_decay=log_decay, cu_seqlens=cu, chunk_size=chunk_size)

    with comm.CommMeter() as meter:
        o = op(*leaves[:4], log_decay=leaves[4])
        o.backward(shard(do, W, r))
    return [o.detach()] + [None if x is None else x.grad for x in leaves], meter.summary()


@pytest.mark.parametrize("W", [2, 3, 4])
@pytest.mark.parametrize("decay,docs", GLOO_CASES)
def test_gloo_ranks_match_reference_fp32(W, decay, docs):
    if docs == "span3" and W < 3:
        pytest.skip("a document spanning three ranks needs three ranks")
    T = 6
    results = run_on_ranks(W, run_delta_sp_rank, "lasp2", T, decay, docs, seed=1)
    q, k, v, beta, a, cu, do = make_delta_inputs(W, T, decay, docs, dtype=torch.float32, seed=1)
    got = gather_grads([res for res, _ in results], a)
    assert all(x is None or x.dtype == torch.float32 for x in got)
    assert_matches(got, delta_reference(q, k, v, beta, a, cu, do), FP32_TOL)


def lasp2_delta_bytes(W: int, B: int) -> int:
    """All-gather bytes sent (= received) per rank, forward + backward, fp32: (E, P) forward,
    dM backward."""
    forward = B * H * DK * (DV + DK)
    backward = B * H * DK * DV
    return (W - 1) * (forward + backward) * 4


# the public function's agreement check gathers 12 int64 per rank (flag + 11 fingerprint fields)
AGREEMENT_BYTES = 12 * 8


@pytest.mark.parametrize("decay,docs", [("none", "none"), ("token", "mixed")])
def test_bytes_are_analytic_and_independent_of_length(decay, docs):
    """In context (the runtime's path): one all-gather forward, one backward; the public function
    adds its agreement all-gather."""
    W = 3
    B = 1 if docs != "none" else 2
    for T in (4, 32):
        for in_context, calls, extra in ((True, 2, 0), (False, 3, (W - 1) * AGREEMENT_BYTES)):
            results = run_on_ranks(W, run_delta_sp_rank, "lasp2", T, decay, docs, 2, 4, in_context)
            for _, summary in results:
                assert set(summary) == {"all_gather"}
                counts = summary["all_gather"]
                assert counts["calls"] == calls
                assert counts["bytes_sent"] == counts["bytes_received"] == lasp2_delta_bytes(W, B) + extra


# ---------------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------------


def _run_with_rank_dependent_documents(ctx):
    q = torch.randn(1, 4, H, DK)
    cu = torch.tensor([0, 3 + ctx.rank, 8])
    try:
        lasp2_delta_rule_attention(q, q, torch.randn(1, 4, H, DV), torch.rand(1, 4, H), group=ctx.world, cu_seqlens=cu)
    except ValueError as exc:
        return str(exc)
    return None


def test_mismatched_documents_across_ranks_raise_on_every_rank():
    messages = run_on_ranks(2, _run_with_rank_dependent_documents)
    assert all(m is not None and "disagree on cu_seqlens checksum" in m for m in messages), messages


def test_bad_shapes_name_the_argument():
    q = torch.randn(1, 4, H, DK)
    with pytest.raises(ValueError, match="beta"):
        lasp2_delta_rule_attention(q, q, torch.randn(1, 4, H, DV), torch.rand(1, 5, H), group=comm.SOLO)
    with pytest.raises(ValueError, match="batch size 1"):
        x = torch.randn(2, 4, H, DK)
        lasp2_delta_rule_attention(
            x, x, torch.randn(2, 4, H, DV), torch.rand(2, 4, H), group=comm.SOLO, cu_seqlens=torch.tensor([0, 2, 4])
        )
