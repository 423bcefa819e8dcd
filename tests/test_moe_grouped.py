"""Grouped experts (one grouped GEMM per projection) against the per-expert loop.

Same layer weights, same inputs: the output and the gradients of the input, of every expert
weight and of the routers must agree. fp32 runs ``torch._grouped_mm`` on CPU (d divisible by 8),
fp64 and odd widths the padded ``bmm``; both only reorder the sums of the loop's GEMMs.
"""

from __future__ import annotations

import pytest
import torch

from moe import MoELayer
from moe.experts import grouped_linear
from tests.attention_cases import rel_err

# fp32 GEMMs summed in another order: a few ulps of the row norms
FP32_TOL = 1e-5
FP64_TOL = 1e-12


def _layer_run(compute: str, *, d: int, hidden: int, dtype: torch.dtype, tokens: int, chain: int):
    torch.manual_seed(0)
    layer = MoELayer(
        d, hidden, num_experts=6, top_k=2, chain_iterations=chain, balance_coef=0.0, expert_compute=compute
    ).to(dtype)
    x = torch.randn(tokens, d, dtype=dtype, requires_grad=True)
    y, _ = layer(x)
    g = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(1))
    y.backward(g)
    names = ["x"] + [name for name, _ in layer.named_parameters()]
    grads = [x.grad] + [p.grad for p in layer.parameters()]
    return y.detach(), dict(zip(names, grads, strict=True))


@pytest.mark.parametrize(
    "d,hidden,dtype,tol",
    [(16, 24, torch.float32, FP32_TOL), (16, 24, torch.float64, FP64_TOL), (12, 20, torch.float32, FP32_TOL)],
    ids=["fp32-grouped_mm", "fp64-bmm", "fp32-odd-width-bmm"],
)
@pytest.mark.parametrize("chain", [1, 2], ids=["moe", "chain2"])
@pytest.mark.parametrize("tokens", [0, 3, 40], ids=["no-tokens", "few", "many"])
def test_grouped_equals_loop(d, hidden, dtype, tol, chain, tokens):
    y_loop, g_loop = _layer_run("loop", d=d, hidden=hidden, dtype=dtype, tokens=tokens, chain=chain)
    y_grp, g_grp = _layer_run("grouped", d=d, hidden=hidden, dtype=dtype, tokens=tokens, chain=chain)
    assert y_grp.shape == y_loop.shape and rel_err(y_grp, y_loop) <= tol
    assert g_grp.keys() == g_loop.keys()
    for name in g_loop:
        assert g_grp[name] is not None, f"{name} got no gradient"
        assert rel_err(g_grp[name], g_loop[name]) <= tol, f"{name}: {rel_err(g_grp[name], g_loop[name]):.2e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grouped_linear_with_empty_experts(dtype):
    counts = [0, 5, 0, 3]
    x = torch.randn(8, 16, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 24, 16, dtype=dtype, requires_grad=True)
    g = torch.randn(8, 24, dtype=dtype)
    got = [grouped_linear(x, w, counts)]
    got += torch.autograd.grad(got[0], (x, w), g)
    ref = [torch.cat([block @ w[e].T for e, block in enumerate(torch.split(x, counts))])]
    ref += torch.autograd.grad(ref[0], (x, w), g)
    tol = FP32_TOL if dtype == torch.float32 else FP64_TOL
    for what, a, b in zip(("y", "dx", "dw"), got, ref, strict=True):
        assert rel_err(a, b) <= tol, what
    assert got[2][0].abs().max() == 0 and got[2][2].abs().max() == 0  # experts without rows: zero gradient


def test_bad_expert_compute_is_a_clear_error():
    with pytest.raises(ValueError, match="expert_compute='fused': allowed auto, grouped, loop"):
        MoELayer(8, 12, num_experts=4, top_k=2, expert_compute="fused")


def _ep_step(ctx, ep_size: int, compute: str, total: int):
    from moe.layer import expert_parallel_group

    torch.manual_seed(0)  # routers identical on every rank
    layer = MoELayer(
        16,
        16,
        num_experts=4,
        top_k=2,
        router="linear",
        ep_size=ep_size,
        ep_group=expert_parallel_group(ep_size),
        balance_coef=0.0,
        seed=5,
        expert_compute=compute,
    )
    x_all = torch.randn(total, 16, generator=torch.Generator().manual_seed(3))
    x = x_all[ctx.rank * total // 2 : (ctx.rank + 1) * total // 2].clone().requires_grad_()
    y, _ = layer(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {
        (gid, name): p.grad.clone()
        for gid, expert in zip(layer.global_expert_ids(), layer.local_experts, strict=True)
        for name, p in expert.named_parameters()
    }
    return y.detach(), x.grad, grads


def test_grouped_under_expert_parallelism_equals_the_loop():
    """gloo, 2 ranks: grouped experts at ep_size=2 against the loop at ep_size=1; each expert's
    gradient summed over the ranks holding a copy (its expert-data-parallel group)."""
    from tests.distributed import run_on_ranks

    ref = run_on_ranks(2, _ep_step, 1, "loop", 20, timeout_s=600)
    got = run_on_ranks(2, _ep_step, 2, "grouped", 20, timeout_s=600)
    for rank in range(2):
        assert rel_err(got[rank][0], ref[rank][0]) <= FP32_TOL
        assert rel_err(got[rank][1], ref[rank][1]) <= FP32_TOL
    totals: dict = {}
    for _, _, grads in ref:
        for key, g in grads.items():
            totals[key] = totals.get(key, 0) + g
    got_grads = {key: g for _, _, grads in got for key, g in grads.items()}
    assert got_grads.keys() == totals.keys()
    for key, g in totals.items():
        assert rel_err(got_grads[key], g) <= FP32_TOL, key
