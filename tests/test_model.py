"""The hybrid model is the same function on any SP group: logits and parameter gradients over
W gloo ranks equal the single-device model's (fp32, <= 1e-5 relative; the gradients of the
replicated parameters are summed over ranks, as the runtime's all-reduce does)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.sp_context import SPContext
from runtime.config import ModelConfig, MoEConfig, ParallelConfig
from runtime.model import build_model, layer_kinds
from tests.distributed import run_on_ranks

FP32_TOL = 1e-5


def tiny_config(decay: str = "per_head", ffn: str = "dense") -> ModelConfig:
    return ModelConfig(
        layer_pattern="LS",
        num_layers=2,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        ffn=ffn,
        linear_decay=decay,
        vocab_size=256,
    )


def loss_and_grads(model, tokens, targets, batch, total=None):
    model.zero_grad()
    logits, balance = model(tokens, batch)
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") + balance.share(tokens=total)
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


MOE = MoEConfig(num_experts=4, top_k=2, router="gru", router_dim=8, balance="global", z_loss_coef=1e-3)


def _setup(decay, linear_sp, softmax_sp, total, ffn="dense", group=None):
    torch.manual_seed(0)
    parallel = ParallelConfig(linear_sp=linear_sp, softmax_sp=softmax_sp)
    model = build_model(tiny_config(decay, ffn), parallel, MOE, balance_group=group)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, total), generator=g)
    targets = torch.randint(0, 256, (1, total), generator=g)
    bounds = [0, 5, total // 2 + 1, total - 3, total]
    return model, tokens, targets, bounds


def _run_sharded(ctx, decay, linear_sp, softmax_sp, total, ffn="dense"):
    model, tokens, targets, bounds = _setup(decay, linear_sp, softmax_sp, total, ffn, ctx.world)
    W, r = ctx.world_size, ctx.rank
    T = total // W
    local = slice(r * T, (r + 1) * T)
    batch = SPContext.build(ctx.world, local_len=T, bounds=bounds)
    return loss_and_grads(model, tokens[:, local], targets[:, local], batch, total)


@pytest.mark.parametrize("W", [2, 4])
@pytest.mark.parametrize(
    "decay,linear_sp,softmax_sp",
    [
        ("per_head", "lasp2", "allgather"),
        ("per_token", "lasp2", "allgather"),
        ("per_head", "lasp1", "ulysses"),
        ("none", "ulysses", "allgather"),
    ],
)
@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_sharded_model_equals_single_device(W, decay, linear_sp, softmax_sp, ffn):
    """With MoE: GRU routers and the global balance loss over the SP group's ranks (the
    shares, normalised by the batch's tokens, sum to the single-device balance loss)."""
    total = 24
    model, tokens, targets, bounds = _setup(decay, linear_sp, softmax_sp, total, ffn)
    ref_logits, ref_grads = loss_and_grads(model, tokens, targets, SPContext.single(total, bounds))
    results = run_on_ranks(W, _run_sharded, decay, linear_sp, softmax_sp, total, ffn)
    logits = torch.cat([res[0] for res in results], dim=1)
    assert ((logits - ref_logits).norm() / ref_logits.norm()).item() <= FP32_TOL
    for name, ref in ref_grads.items():
        summed = sum(res[1][name] for res in results)
        err = ((summed - ref).norm() / ref.norm().clamp_min(1e-12)).item()
        assert err <= FP32_TOL, f"{name}: {err:.2e}"


def test_layer_pattern_repeats_to_num_layers():
    config = ModelConfig(layer_pattern="LLS", num_layers=5, ffn="dense")
    assert layer_kinds(config) == ["L", "L", "S", "L", "L"]
