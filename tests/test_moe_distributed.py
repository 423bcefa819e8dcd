"""MoE over gloo ranks (DESIGN invariants 3 and 4).

- Global-batch LBL: each rank's share, summed over ranks, equals one process's LBL over the
  concatenated batch, in value and in gradient; with uneven token counts, a rank with none, and
  SP shards of packed sequences (sequence-level LBL over the SP group).
- Expert parallelism is transparent: ep_size 1, 2, 4 give the same outputs and gradients (no
  token is ever dropped), a rank with zero tokens included.

Tolerances: fp64 balance maths 1e-12 relative; fp32 layers 1e-5 relative (summation order of
the all-to-all and of the gradient sums differs from the reference).
"""

from __future__ import annotations

import pytest
import torch

from moe import BalanceTracker, MoELayer, load_balancing_loss, route_topk
from moe.balance import sequence_ids, sequence_load_balancing_loss
from tests.distributed import run_on_ranks

EXACT = 1e-12
FP32_TOL = 1e-5
E, K = 6, 2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def split_sizes(total: int, world: int) -> list[int]:
    """Uneven token counts; at 4 ranks, rank 1 gets none."""
    if world == 2:
        return [total - 3, 3]
    return [total - 12, 0, 5, 7]


def make_logits(total: int, num_sites: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(num_sites, total, E, generator=g, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------
# global LBL
# ---------------------------------------------------------------------------------------------


def _global_share(ctx, total):
    sizes = split_sizes(total, ctx.world_size)
    start = sum(sizes[: ctx.rank])
    logits = make_logits(total)[0, start : start + sizes[ctx.rank]].clone().requires_grad_()
    r = route_topk(logits, K)
    share = load_balancing_loss(r.probs_TE, r.experts_TK, num_experts=E, group=ctx.world)
    share.backward()
    return share.detach(), logits.grad


@pytest.mark.parametrize("W", [2, 4])
def test_global_lbl_shares_sum_to_single_process_lbl(W):
    total = 40
    logits = make_logits(total)[0].requires_grad_()
    r = route_topk(logits, K)
    ref = load_balancing_loss(r.probs_TE, r.experts_TK, num_experts=E)
    ref.backward()
    results = run_on_ranks(W, _global_share, total)
    assert abs(sum(s for s, _ in results).item() - ref.item()) <= EXACT * ref.item()
    assert rel_err(torch.cat([g for _, g in results]), logits.grad) <= EXACT


def _tracker_shares(ctx, total, num_sites, microbatches):
    """Several sites through the tracker's single async all-reduce, over GA micro-batches."""
    sizes = split_sizes(total, ctx.world_size)
    start = sum(sizes[: ctx.rank])
    logits = make_logits(total, num_sites)[:, start : start + sizes[ctx.rank]].clone().requires_grad_()
    tracker = BalanceTracker(num_experts=E, top_k=K, num_sites=num_sites, balance="global", coef=1.0, group=ctx.world)
    losses = []
    for chunk in logits.tensor_split(microbatches, dim=1):
        tracker.begin_microbatch(token_normalizer=total)
        for site in range(num_sites):
            tracker.record(site, route_topk(chunk[site], K))
        losses.append(tracker.loss())
    sum(losses).backward()
    return torch.stack(losses).detach(), logits.grad, tracker.buffer_counts_SE


@pytest.mark.parametrize("W", [2, 4])
def test_tracker_global_lbl_over_sites_equals_single_process(W):
    total, sites = 40, 3
    logits = make_logits(total, sites).requires_grad_()
    ref = sum(
        load_balancing_loss(r.probs_TE, r.experts_TK, num_experts=E)
        for r in (route_topk(logits[s], K) for s in range(sites))
    )
    ref.backward()
    results = run_on_ranks(W, _tracker_shares, total, sites, 1)
    assert abs(sum(loss.sum() for loss, _, _ in results).item() - ref.item()) <= EXACT * ref.item()
    assert rel_err(torch.cat([g for _, g, _ in results], dim=1), logits.grad) <= EXACT
    counts = torch.stack([torch.bincount(logits[s].topk(K).indices.flatten(), minlength=E) for s in range(sites)])
    for _, _, buffer in results:  # every rank's GA buffer holds the global counts
        assert torch.equal(buffer, counts.double())


def test_tracker_ga_buffer_over_ranks_matches_single_process_buffer():
    """Two micro-batches on 2 ranks: the same losses as one process whose micro-batches hold
    both ranks' tokens (buffer semantics are per global micro-batch, not per rank)."""
    total, W = 40, 2
    results = run_on_ranks(W, _tracker_shares, total, 1, 2)
    sizes = split_sizes(total, W)
    logits = make_logits(total, 1)[0]
    per_rank = logits.split(sizes)
    tracker = BalanceTracker(num_experts=E, top_k=K, num_sites=1, coef=1.0)
    expected = []
    for m in range(2):
        chunks = [p.tensor_split(2)[m] for p in per_rank]
        tracker.begin_microbatch(token_normalizer=total)
        tracker.record(0, route_topk(torch.cat(chunks), K))
        expected.append(tracker.loss())
    got = sum(loss for loss, _, _ in results)
    assert rel_err(got, torch.stack(expected)) <= EXACT


# ---------------------------------------------------------------------------------------------
# sequence-level LBL with SP shards
# ---------------------------------------------------------------------------------------------

CU = torch.tensor([0, 5, 13, 14, 24])  # documents cut anywhere, one of length 1


def _sequence_share(ctx, total):
    T = total // ctx.world_size
    logits = make_logits(total)[0, ctx.rank * T : (ctx.rank + 1) * T].clone().requires_grad_()
    r = route_topk(logits, K)
    seq = sequence_ids(CU, ctx.rank * T, T)
    share = sequence_load_balancing_loss(
        r.probs_TE, r.experts_TK, num_experts=E, seq_ids_T=seq, num_sequences=4, group=ctx.world, normalizer=4
    )
    share.backward()
    return share.detach(), logits.grad


@pytest.mark.parametrize("W", [2, 4])
def test_sequence_lbl_over_sp_shards_equals_whole_sequences(W):
    total = 24
    logits = make_logits(total)[0].requires_grad_()
    r = route_topk(logits, K)
    ref = sequence_load_balancing_loss(
        r.probs_TE, r.experts_TK, num_experts=E, seq_ids_T=sequence_ids(CU, 0, total), num_sequences=4
    )
    ref.backward()
    results = run_on_ranks(W, _sequence_share, total)
    assert abs(sum(s for s, _ in results).item() - ref.item()) <= EXACT * ref.item()
    assert rel_err(torch.cat([g for _, g in results]), logits.grad) <= EXACT


# ---------------------------------------------------------------------------------------------
# expert parallelism
# ---------------------------------------------------------------------------------------------


def _ep_layer_step(ctx, ep_size, chain, router, total):
    from moe.layer import expert_parallel_group

    torch.manual_seed(0)  # routers: identical on every rank, as the runtime seeds them
    layer = MoELayer(
        8,
        12,
        num_experts=8,
        top_k=2,
        router=router,
        router_dim=6,
        chain_iterations=chain,
        ep_size=ep_size,
        ep_group=expert_parallel_group(ep_size),
        balance_coef=0.0,
        seed=5,
    )
    sizes = split_sizes(total, ctx.world_size)
    start = sum(sizes[: ctx.rank])
    x = torch.randn(total, 8, generator=torch.Generator().manual_seed(3))[start : start + sizes[ctx.rank]]
    x.requires_grad_()
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()  # any fixed cotangent
    expert_grads = {
        (gid, name): p.grad.clone()
        for gid, expert in zip(layer.global_expert_ids(), layer.local_experts, strict=True)
        for name, p in expert.named_parameters()
    }
    router_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if "deepspeed_moe" not in n}
    return y.detach(), x.grad, expert_grads, router_grads


def _expert_grad_totals(results):
    """Sum each global expert's gradient over the ranks holding a copy (its expert-DP group)."""
    totals: dict = {}
    for _, _, expert_grads, _ in results:
        for key, g in expert_grads.items():
            totals[key] = totals.get(key, 0) + g
    return totals


@pytest.mark.parametrize("chain,router", [(1, "linear"), (2, "gru")])
def test_expert_parallel_sizes_give_equal_outputs_and_gradients(chain, router):
    W, total = 4, 30
    runs = {ep: run_on_ranks(W, _ep_layer_step, ep, chain, router, total) for ep in (1, 2, 4)}
    ref = runs[1]
    ref_experts = _expert_grad_totals(ref)
    for ep in (2, 4):
        res = runs[ep]
        for rank in range(W):
            if ref[rank][0].numel():
                assert rel_err(res[rank][0], ref[rank][0]) <= FP32_TOL
                assert rel_err(res[rank][1], ref[rank][1]) <= FP32_TOL
            for name, g in ref[rank][3].items():
                assert rel_err(res[rank][3][name], g) <= FP32_TOL, (ep, rank, name)
        experts = _expert_grad_totals(res)
        assert experts.keys() == ref_experts.keys()
        for key, g in ref_experts.items():
            assert rel_err(experts[key], g) <= FP32_TOL, (ep, key)
    assert runs[4][1][0].shape == (0, 8)  # rank 1 held no tokens and still took part
