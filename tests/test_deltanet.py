"""The Gated DeltaNet block (layer letter G): the SP model equals the single-device model (fp32,
<= 1e-5 relative, logits and every parameter gradient, replicated parameters' gradients summed
over ranks), and the short convolution's left context crosses rank cuts but never a document start."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel import comm
from parallel.sp_context import SPContext, positions_in_documents
from runtime.config import ConfigError, ModelConfig, ParallelConfig
from runtime.deltanet import CONV_KERNEL, causal_conv, conv_left_context
from runtime.model import build_model
from tests.distributed import run_on_ranks
from tests.sp_sim import rel_err

FP32_TOL = 1e-5


def gdn_config(pattern: str = "GS") -> ModelConfig:
    return ModelConfig(
        layer_pattern=pattern,
        num_layers=len(pattern),
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        ffn="dense",
    )


def _setup(pattern, linear_sp, total, bounds):
    torch.manual_seed(0)
    model = build_model(gdn_config(pattern), ParallelConfig(linear_sp=linear_sp))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, total), generator=g)
    targets = torch.randint(0, 256, (1, total), generator=g)
    return model, tokens, targets, torch.tensor(bounds)


def loss_and_grads(model, tokens, targets, batch):
    model.zero_grad()
    logits = model(tokens, batch).logits
    F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _run_sharded(ctx, pattern, linear_sp, total, bounds):
    model, tokens, targets, cu = _setup(pattern, linear_sp, total, bounds)
    W, r = ctx.world_size, ctx.rank
    T = total // W
    local = slice(r * T, (r + 1) * T)
    return loss_and_grads(
        model, tokens[:, local], targets[:, local], SPContext.build(ctx.world, local_len=T, bounds=bounds)
    )


CASES = [
    # (W, total tokens, document bounds): documents inside, on a cut, spanning; shards of 2 < halo
    (2, 24, [0, 5, 12, 21, 24]),
    (3, 24, [0, 8, 11, 24]),
    (4, 24, [0, 1, 6, 13, 24]),
    (4, 8, [0, 2, 3, 8]),
]


@pytest.mark.parametrize("W,total,bounds", CASES, ids=lambda x: str(x))
@pytest.mark.parametrize("linear_sp", ["lasp2", "scan", "lasp1", "ulysses"])
def test_sharded_gdn_model_equals_single_device(W, total, bounds, linear_sp):
    if linear_sp == "ulysses" and W == 3:
        pytest.skip("Ulysses splits the 4 heads over the ranks: W must divide 4")
    pattern = "GLS"
    model, tokens, targets, cu = _setup(pattern, linear_sp, total, bounds)
    ref_logits, ref_grads = loss_and_grads(model, tokens, targets, SPContext.single(total, bounds))
    results = run_on_ranks(W, _run_sharded, pattern, linear_sp, total, bounds)
    logits = torch.cat([res[0] for res in results], dim=1)
    assert rel_err(logits, ref_logits) <= FP32_TOL
    for name, want in ref_grads.items():
        got = sum(res[1][name] for res in results)
        assert rel_err(got, want) <= FP32_TOL, f"{name}: {rel_err(got, want):.2e}"


def _conv_reference(x_BNC, weight_CK, bounds):
    """Per document: F.conv1d with K-1 zeros of left padding (an independent formulation)."""
    outs = []
    for a, b in zip(bounds, bounds[1:]):
        doc = x_BNC[:, a:b].transpose(1, 2)
        y = F.conv1d(F.pad(doc, (weight_CK.shape[1] - 1, 0)), weight_CK[:, None, :], groups=doc.shape[1])
        outs.append(y.transpose(1, 2))
    return torch.cat(outs, dim=1)


def _run_conv(ctx, x, weight, bounds, dy):
    W, r = ctx.world_size, ctx.rank
    T = x.shape[1] // W
    x_r = x[:, r * T : (r + 1) * T].clone().requires_grad_()
    w = weight.clone().requires_grad_()
    with comm.CommMeter() as meter:
        halo = conv_left_context(x_r, CONV_KERNEL - 1, ctx.world)
        pos = positions_in_documents(bounds, r * T, T)
        y = causal_conv(x_r, halo, w, pos)
        y.backward(dy[:, r * T : (r + 1) * T])
    return y.detach(), x_r.grad, w.grad, meter.summary()


@pytest.mark.parametrize("W,total,bounds", [(3, 15, [0, 5, 7, 15]), (4, 8, [0, 3, 8])], ids=str)
def test_conv_halo_crosses_ranks_not_documents(W, total, bounds):
    g = torch.Generator().manual_seed(0)
    C = 6
    x = torch.randn(1, total, C, generator=g)
    weight = torch.randn(C, CONV_KERNEL, generator=g)
    dy = torch.randn(1, total, C, generator=g)
    xr, wr = x.clone().double().requires_grad_(), weight.clone().double().requires_grad_()
    want = _conv_reference(xr, wr, bounds)
    dx_want, dw_want = torch.autograd.grad(want, [xr, wr], dy.double())
    results = run_on_ranks(W, _run_conv, x, weight, bounds, dy)
    assert rel_err(torch.cat([r[0] for r in results], 1), want) <= FP32_TOL
    assert rel_err(torch.cat([r[1] for r in results], 1), dx_want) <= FP32_TOL
    assert rel_err(sum(r[2] for r in results), dw_want) <= FP32_TOL
    T = total // W
    for r, res in enumerate(results):
        meter = res[3]
        if T >= CONV_KERNEL - 1:  # P2P: (K-1) tokens of C fp32 to the next rank, gradients back
            halo = (CONV_KERNEL - 1) * C * 4
            assert meter["send"]["bytes_sent"] == halo * ((r + 1 < W) + (r > 0))
        else:  # all-gather of the (short) shards, reduce-scatter of their gradients
            assert meter["all_gather"]["bytes_sent"] == (W - 1) * T * C * 4


def test_layer_letter_g_is_allowed_and_others_are_not():
    gdn_config("GGGS").validate()
    with pytest.raises(ConfigError, match="gated DeltaNet"):
        gdn_config("GX").validate()


def test_cost_model_volumes_cover_g_layers():
    """seqmoe profile's communication terms: per peer, LASP-2 moves 3 states per G layer (state
    and transition forward, dM backward), L layers 2; the scan's hop is 1/pieces of that."""
    from parallel.scan import DEFAULT_PIECES
    from runtime.config import load_config
    from runtime.profile import comm_volumes

    state = 4 * 32 * 32 * 4  # 4 heads of 32 x 32, fp32
    for linear_sp, g_states, scale in (("lasp2", 3, 1), ("lasp1", 2, 1), ("scan", 2, DEFAULT_PIECES)):
        config = load_config("configs/tiny-gdn-cpu.toml", ["--model.ffn=dense", f"--parallel.linear_sp={linear_sp}"])
        _, _, per_group = comm_volumes(config, elem_bytes=4)
        assert per_group == 3 * g_states * state / scale  # GGGS: three G layers


def _count_gdn_step(ctx, num_layers: int):
    """Host reads and collective calls of one training step of a dense GGGS model at SP=2."""
    from planner.plan import Group, MicroBatch, StepPlan
    from tests.test_host_syncs import count_host_reads, training_step

    torch.manual_seed(0)
    config = ModelConfig(
        layer_pattern="GGGS", num_layers=num_layers, d_model=32, num_heads=4, num_kv_heads=2, ffn_hidden=48, ffn="dense"
    )
    model = build_model(config, ParallelConfig(linear_sp="lasp2", softmax_sp="allgather"))
    g = torch.Generator().manual_seed(1)
    sequences = [torch.randint(0, 256, (n,), generator=g) for n in (9, 14, 5, 11)]
    ranks = tuple(range(ctx.world_size))
    micro = [MicroBatch(groups=[Group(ranks, [0, 1])]), MicroBatch(groups=[Group(ranks, [2, 3])])]
    plan = StepPlan(micro, num_ranks=ctx.world_size, predicted_time_s=0.0, solver="static", solve_time_s=0.0)
    training_step(model, ctx, plan, sequences)  # warm-up
    model.zero_grad()
    with comm.CommMeter() as meter, count_host_reads() as reads:
        training_step(model, ctx, plan, sequences)
    return sum(reads.values()), meter.calls


def test_gdn_layers_read_nothing_back_and_add_fixed_collectives():
    """DESIGN invariant 8 for G layers: host reads per step do not grow with depth; each extra G
    layer adds, per micro-batch, its state all-gather forward and dM all-gather backward, plus
    the convolution halo's shift forward and its gradient's shift back (P2P)."""
    counts = {n: run_on_ranks(2, _count_gdn_step, n) for n in (4, 8)}
    for rank in range(2):
        (reads4, calls4), (reads8, calls8) = counts[4][rank], counts[8][rank]
        assert reads8 == reads4, (reads4, reads8)
        # 8 - 4 layers of GGGS = 3 more G layers and 1 more S layer; 2 micro-batches
        assert calls8["all_gather"] - calls4["all_gather"] == 2 * (3 * 2 + 1)
        # SP=2: rank 0 sends the halo and receives its gradient, rank 1 the reverse
        assert calls8["send"] - calls4["send"] == 3 * 2
        assert calls8["recv"] - calls4["recv"] == 3 * 2


def test_gdn_model_runs_on_the_meta_device():
    """DESIGN invariant 7: at SP=1 the G block's forward and backward create every tensor on the
    context's device and read nothing back (meta tensors have no values to read)."""
    config = gdn_config("GGS")
    with torch.device("meta"):
        model = build_model(config, ParallelConfig())
    tokens = torch.randint(0, 256, (1, 20), device="meta")
    logits = model(tokens, SPContext.single(20, [0, 7, 20], device="meta")).logits
    logits.float().sum().backward()
    assert logits.device.type == "meta" and model.blocks[0].mix.conv.grad.device.type == "meta"
