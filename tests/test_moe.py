"""MoE in one process: balance losses against hand computations, the GA buffer, the GRU router
against a hand-written GRU, Chain-of-Experts and the layer against a naive per-token reference,
recompute safety, metrics and bad options. Tolerances: fp64 hand computations 1e-12; fp32 layer
outputs against the naive reference 1e-6 relative."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe import BalanceTracker, MoELayer, RoutingMetrics, load_balancing_loss, route_topk, z_loss
from moe.balance import SequenceLayout, sequence_ids, sequence_load_balancing_loss
from moe.metrics import max_violation
from moe.router import GRURouter, make_gru_cell
from parallel.sp_context import SPContext
from runtime.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from runtime.model import build_model

EXACT = 1e-12
FP32_TOL = 1e-6


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------
# balance losses
# ---------------------------------------------------------------------------------------------


def test_micro_lbl_by_hand():
    # 4 tokens, 2 experts, top-1: expert 0 chosen 3 times, expert 1 once
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]], dtype=torch.float64)
    topk = torch.tensor([[0], [0], [0], [1]])
    # f = [3/4, 1/4], P = [2.4/4, 1.6/4] -> LBL = 2 * (0.75*0.6 + 0.25*0.4) = 1.1
    loss = load_balancing_loss(probs, topk, num_experts=2)
    assert abs(loss.item() - 1.1) <= EXACT


def test_lbl_is_one_when_balanced_and_e_over_k_when_collapsed():
    E, k = 4, 2
    uniform = torch.full((8, E), 1.0 / E, dtype=torch.float64)
    balanced = torch.tensor([[0, 1], [2, 3]] * 4)
    assert abs(load_balancing_loss(uniform, balanced, num_experts=E).item() - 1.0) <= EXACT
    # everything on experts 0 and 1 with all probability there: E * (0.5*0.5 + 0.5*0.5) = E/k
    collapsed = torch.tensor([[0.5, 0.5, 0.0, 0.0]] * 8, dtype=torch.float64)
    loss = load_balancing_loss(collapsed, torch.tensor([[0, 1]] * 8), num_experts=E)
    assert abs(loss.item() - E / k) <= EXACT


def test_lbl_gradient_by_hand():
    # d LBL / d p_ti = E * f_i / T (f carries no gradient)
    logits = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    probs = logits.softmax(-1)
    probs.retain_grad()
    topk = probs.topk(2, dim=-1).indices
    load_balancing_loss(probs, topk, num_experts=3).backward()
    f = torch.bincount(topk.flatten(), minlength=3).double() / (6 * 2)
    assert rel_err(probs.grad, (3 * f / 6).expand(6, 3)) <= EXACT


def test_sequence_lbl_by_hand():
    # two sequences of 2 tokens, top-1 over 2 experts
    probs = torch.tensor([[0.9, 0.1], [0.7, 0.3], [0.4, 0.6], [0.2, 0.8]], dtype=torch.float64)
    topk = torch.tensor([[0], [0], [1], [1]])
    seq = torch.tensor([0, 0, 1, 1])
    # seq 0: f=[1,0], P=[0.8,0.2] -> 2*0.8 = 1.6; seq 1: f=[0,1], P=[0.3,0.7] -> 1.4; mean 1.5
    loss = sequence_load_balancing_loss(probs, topk, num_experts=2, seq_ids_T=seq, num_sequences=2)
    assert abs(loss.item() - 1.5) <= EXACT
    # the micro LBL of the same tokens is balanced-looking: f=[.5,.5], P=[.55,.45] -> 1.0
    assert abs(load_balancing_loss(probs, topk, num_experts=2).item() - 1.0) <= EXACT


def test_sequence_ids_follow_cu_seqlens_and_offset():
    cu = torch.tensor([0, 3, 4, 9])
    assert sequence_ids(cu, 2, 4).tolist() == [0, 1, 2, 2]
    assert sequence_ids(None, 5, 3).tolist() == [0, 0, 0]


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    assert abs(z_loss(logits).item() - expected) <= EXACT


def _routing(T: int, E: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64).requires_grad_()
    return logits, route_topk(logits, k)


def test_ga_buffer_accumulates_counts_and_resets_after_step():
    """Micro-batch m's f comes from the counts of micro-batches 1..m; begin_step() empties it."""
    E, k = 4, 2
    tracker = BalanceTracker(num_experts=E, top_k=k, num_sites=1, balance="global", coef=1.0)
    _, r1 = _routing(5, E, k, 1)
    _, r2 = _routing(7, E, k, 2)
    tracker.begin_microbatch()
    tracker.record(0, r1)
    loss1 = tracker.loss()
    tracker.begin_microbatch()
    tracker.record(0, r2)
    loss2 = tracker.loss()
    counts = torch.bincount(r1.experts_TK.flatten(), minlength=E) + torch.bincount(r2.experts_TK.flatten(), minlength=E)
    f = counts.double() / (12 * k)
    assert abs(loss1.item() - load_balancing_loss(r1.probs_TE, r1.experts_TK, num_experts=E).item()) <= EXACT
    assert abs(loss2.item() - (E * (f * r2.probs_TE.sum(0)).sum() / 7).item()) <= EXACT
    assert tracker.buffer_tokens_S.tolist() == [12.0]
    tracker.begin_step()
    assert tracker.buffer_tokens_S.tolist() == [0.0] and tracker.buffer_counts_SE.abs().sum() == 0
    tracker.begin_microbatch()
    tracker.record(0, r2)
    fresh = load_balancing_loss(r2.probs_TE, r2.experts_TK, num_experts=E)
    assert abs(tracker.loss().item() - fresh.item()) <= EXACT


def test_tracker_token_normaliser_makes_microbatch_shares_sum_to_the_batch_lbl():
    """Two micro-batches of one step, normalised by the step's tokens: with the full-step counts
    in the buffer (second micro-batch), the shares are the LBL of the whole step."""
    E, k = 4, 1
    _, r1 = _routing(6, E, k, 3)
    _, r2 = _routing(10, E, k, 4)
    tracker = BalanceTracker(num_experts=E, top_k=k, num_sites=1, balance="micro", coef=1.0)
    shares = []
    for r in (r1, r2):
        tracker.begin_microbatch(token_normalizer=16)
        tracker.record(0, r)
        shares.append(tracker.loss())
    # micro: each micro-batch's LBL weighted by its token fraction
    lbl = [load_balancing_loss(r.probs_TE, r.experts_TK, num_experts=E) for r in (r1, r2)]
    expected = lbl[0] * 6 / 16 + lbl[1] * 10 / 16
    assert abs(sum(shares).item() - expected.item()) <= EXACT


def test_tracker_sequence_mode_matches_the_function():
    E, k = 4, 2
    logits, r = _routing(9, E, k, 5)
    seq = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    tracker = BalanceTracker(num_experts=E, top_k=k, num_sites=1, balance="sequence", coef=1.0)
    tracker.begin_microbatch(sequence=SequenceLayout(seq, 3))
    tracker.record(0, r)
    expected = sequence_load_balancing_loss(r.probs_TE, r.experts_TK, num_experts=E, seq_ids_T=seq, num_sequences=3)
    assert abs(tracker.loss().item() - expected.item()) <= EXACT


def test_tracker_rejects_a_site_recorded_twice_outside_recompute():
    tracker = BalanceTracker(num_experts=4, top_k=1, num_sites=1)
    _, r = _routing(3, 4, 1, 6)
    tracker.begin_microbatch()
    tracker.record(0, r)
    with pytest.raises(RuntimeError, match="begin_microbatch"):
        tracker.record(0, r)


# ---------------------------------------------------------------------------------------------
# routers
# ---------------------------------------------------------------------------------------------


def manual_gru(cell: torch.nn.GRUCell, x, h):
    """The GRU equations written out (PyTorch's gate order: reset, update, new)."""
    W_ir, W_iz, W_in = cell.weight_ih.chunk(3)
    W_hr, W_hz, W_hn = cell.weight_hh.chunk(3)
    b_ir, b_iz, b_in = cell.bias_ih.chunk(3)
    b_hr, b_hz, b_hn = cell.bias_hh.chunk(3)
    r = torch.sigmoid(x @ W_ir.T + b_ir + h @ W_hr.T + b_hr)
    z = torch.sigmoid(x @ W_iz.T + b_iz + h @ W_hz.T + b_hz)
    n = torch.tanh(x @ W_in.T + b_in + r * (h @ W_hn.T + b_hn))
    return (1 - z) * n + z * h


def test_gru_router_matches_manual_gru_over_two_layers():
    torch.manual_seed(0)
    cell = make_gru_cell(8).double()
    layers = [GRURouter(12, 5, cell).double() for _ in range(2)]
    x1, x2 = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    logits1, h1 = layers[0](x1)
    logits2, h2 = layers[1](x2, h1)
    m1 = manual_gru(cell, x1 @ layers[0].proj.weight.T, torch.zeros(7, 8, dtype=torch.float64))
    m2 = manual_gru(cell, x2 @ layers[1].proj.weight.T, m1)
    assert rel_err(h1, m1) <= EXACT and rel_err(h2, m2) <= EXACT
    assert rel_err(logits2, m2 @ layers[1].gate.weight.T) <= EXACT


def test_gru_router_gradient_reaches_earlier_layers():
    """A loss on layer 2's routing alone trains layer 1's projection (through h, never detached)."""
    torch.manual_seed(0)
    cell = make_gru_cell(8)
    layers = [GRURouter(12, 5, cell) for _ in range(2)]
    _, h1 = layers[0](torch.randn(7, 12))
    logits2, _ = layers[1](torch.randn(7, 12), h1)
    route_topk(logits2, 2).probs_TE[:, 0].sum().backward()
    assert layers[0].proj.weight.grad.abs().sum() > 0
    assert layers[0].gate.weight.grad is None  # layer 1's gate does not feed layer 2


def test_shared_gru_cell_is_one_set_of_parameters_in_the_model():
    moe = MoEConfig(num_experts=4, top_k=2, router="gru", router_dim=8)
    model = build_model(_tiny(num_layers=3), ParallelConfig(), moe)
    cells = [n for n, _ in model.named_parameters() if "gru_cell" in n]
    assert cells == ["gru_cell.weight_ih", "gru_cell.weight_hh", "gru_cell.bias_ih", "gru_cell.bias_hh"]


def test_topk_renormalises_only_for_k_above_one():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    assert rel_err(route_topk(logits, 2).weights_TK.sum(-1), torch.ones(1)) <= FP32_TOL
    top1 = route_topk(logits, 1)
    assert rel_err(top1.weights_TK[:, 0], top1.probs_TE[:, 0]) <= FP32_TOL


# ---------------------------------------------------------------------------------------------
# the layer and Chain-of-Experts against a naive reference
# ---------------------------------------------------------------------------------------------


def naive_moe(layer: MoELayer, x_TD: torch.Tensor) -> torch.Tensor:
    """Token by token, iteration by iteration, straight from the CoE equations (linear router)."""
    experts = layer.local_experts
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        x_t, total = x_TD[t], torch.zeros_like(x_TD[t])
        for it, router in enumerate(layer.routers):
            probs = F.softmax(router.gate.weight.float() @ x_t.float(), dim=-1)
            top_p, top_e = probs.topk(layer.k_per_iteration)
            # plain MoE renormalises top-k > 1; CoE iterations only with chain_norm_topk_prob
            renormalize = layer.chain_iterations == 1 or layer.renormalize
            if layer.k_per_iteration > 1 and renormalize:
                top_p = top_p / top_p.sum()
            step = sum(p * experts[int(e)](x_t[None])[0] for p, e in zip(top_p, top_e, strict=True))
            if layer.shared_ffn is not None:
                step = step + layer.shared_ffn(x_t[None])[0]
            total = total + step
            if it + 1 < len(layer.routers):
                x_t = x_t + step
        out[t] = total
    return out


@pytest.mark.parametrize(
    "chain,top_k,shared,norm",
    [(1, 2, False, False), (1, 1, True, False), (2, 2, False, False), (2, 4, True, False), (2, 4, True, True)],
)
def test_layer_equals_naive_reference(chain, top_k, shared, norm):
    torch.manual_seed(0)
    layer = MoELayer(
        16, 24, num_experts=6, top_k=top_k, chain_iterations=chain, shared_expert=shared, chain_norm_topk_prob=norm
    )
    x = torch.randn(9, 16)
    y, state = layer(x)
    assert state is None
    assert rel_err(y, naive_moe(layer, x)) <= FP32_TOL


def test_chain_uses_raw_topk_probabilities_by_default_like_the_reference():
    """CoE reference (norm_topk_prob=false): iteration weights are the raw softmax probabilities;
    renormalising them is an option and gives a different layer (checked against the naive CoE)."""
    torch.manual_seed(0)
    raw = MoELayer(16, 24, num_experts=6, top_k=4, chain_iterations=2)
    normed = MoELayer(16, 24, num_experts=6, top_k=4, chain_iterations=2, chain_norm_topk_prob=True)
    normed.load_state_dict(raw.state_dict())
    x = torch.randn(9, 16)
    y_raw, y_normed = raw(x)[0], normed(x)[0]
    assert rel_err(y_raw, naive_moe(raw, x)) <= FP32_TOL
    assert rel_err(y_normed, naive_moe(normed, x)) <= FP32_TOL
    assert rel_err(y_raw, y_normed) > 0.01  # the two settings are different functions


def test_chain_with_one_iteration_is_a_plain_moe_block():
    """The block keeps the pre-norm residual: x + MoE(norm(x)) (the CoE reference drops x)."""
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, router="linear", chain_iterations=1)
    model = build_model(_tiny(num_layers=1), ParallelConfig(), moe)
    block = model.blocks[0]
    x = torch.randn(1, 5, 32)
    model.tracker.begin_microbatch()
    y, _ = block(x, SPContext.single(5))
    h = x + block.mix(block.mix_norm(x), SPContext.single(5))
    expected = h + naive_moe(block.ffn, block.ffn_norm(h)[0])[None]
    assert rel_err(y, expected) <= FP32_TOL


@pytest.mark.parametrize("norm", [False, True])
def test_layer_gradients_match_naive_reference(norm):
    torch.manual_seed(0)
    layer = MoELayer(8, 12, num_experts=4, top_k=4, chain_iterations=2, balance_coef=0.0, chain_norm_topk_prob=norm)
    x = torch.randn(5, 8, requires_grad=True)
    layer(x)[0].pow(2).sum().backward()
    got = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    x.grad = None
    naive_moe(layer, x).pow(2).sum().backward()
    want = [x.grad] + [p.grad for p in layer.parameters()]
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) <= 1e-5


def test_layer_with_zero_tokens():
    layer = MoELayer(8, 12, num_experts=4, top_k=2, router="gru", router_dim=4)
    x = torch.zeros(0, 8, requires_grad=True)
    y, state = layer(x)
    (y.sum() + layer.aux_loss()).backward()
    assert y.shape == (0, 8) and state.shape == (0, 4)
    assert layer.aux_loss().item() == 0.0
    assert all(p.grad is not None for p in layer.local_experts.parameters())


def test_experts_have_distinct_weights_and_depend_only_on_global_id():
    a = MoELayer(8, 12, num_experts=4, top_k=2, seed=3, layer_index=1)
    b = MoELayer(8, 12, num_experts=4, top_k=2, seed=3, layer_index=1)
    assert torch.equal(a.local_experts[2].up.weight, b.local_experts[2].up.weight)
    assert not torch.equal(a.local_experts[0].up.weight, a.local_experts[1].up.weight)


# ---------------------------------------------------------------------------------------------
# the model: recompute, metrics
# ---------------------------------------------------------------------------------------------


def _tiny(num_layers: int = 2, checkpointing: bool = False) -> ModelConfig:
    return ModelConfig(
        layer_pattern="LS",
        num_layers=num_layers,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        ffn="moe",
        activation_checkpointing=checkpointing,
    )


def _train_step(checkpointing: bool, router: str, balance: str):
    torch.manual_seed(0)
    moe = MoEConfig(num_experts=4, top_k=2, router=router, router_dim=8, balance=balance, z_loss_coef=1e-3)
    model = build_model(_tiny(3, checkpointing), ParallelConfig(), moe, domain_names=("a", "b"))
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (1, 20), generator=g)
    bounds = [0, 7, 20]
    domains = torch.tensor([0] * 7 + [1] * 13)
    logits, balance = model(tokens, SPContext.single(20, bounds), domains_T=domains)
    loss = F.cross_entropy(logits[0, :-1], tokens[0, 1:]) + balance.value()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, model.tracker.buffer_counts_SE.clone(), model.routing_metrics.summary()


@pytest.mark.parametrize("router,balance", [("gru", "global"), ("linear", "sequence"), ("gru", "micro")])
def test_activation_recompute_changes_neither_counts_nor_gradients(router, balance):
    loss0, grads0, buffer0, metrics0 = _train_step(False, router, balance)
    loss1, grads1, buffer1, metrics1 = _train_step(True, router, balance)
    assert abs(loss0.item() - loss1.item()) <= FP32_TOL * abs(loss0.item())
    for name, g in grads0.items():
        assert rel_err(grads1[name], g) <= 1e-5, name
    assert torch.equal(buffer0, buffer1)
    assert metrics0 == metrics1
    assert sum(metrics1["sites"][0]["tokens_per_expert"]) == 20 * 2  # counted once, not twice
    if router == "gru":
        assert grads1["gru_cell.weight_hh"].abs().sum() > 0


def test_eval_forward_observes_metrics_but_no_loss_statistics():
    moe = MoEConfig(num_experts=4, top_k=2)
    model = build_model(_tiny(2), ParallelConfig(), moe, domain_names=("a",))
    with torch.no_grad():
        _, balance = model(
            torch.randint(0, 256, (1, 6)), SPContext.single(6), domains_T=torch.zeros(6, dtype=torch.long)
        )
    assert balance.value().item() == 0.0
    assert model.tracker.buffer_tokens_S.sum() == 0
    assert model.routing_metrics.summary()["sites"][0]["tokens"] == 6


def test_metrics_by_hand():
    metrics = RoutingMetrics(num_sites=1, num_experts=4, domain_names=("code", "prose"))
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.6, 0.2, 0.1, 0.1]])
    r = route_topk(probs.log(), 1)
    metrics.observe(0, r, torch.tensor([0, 1, 0]))
    s = metrics.summary()
    site = s["sites"][0]
    assert site["tokens_per_expert"] == [2, 1, 0, 0]
    assert abs(site["max_vio"] - (2 - 0.75) / 0.75) <= 1e-12
    assert site["dead_experts"] == 2
    assert abs(site["topk_score_sum"] - (0.7 + 0.7 + 0.6) / 3) <= 1e-6
    assert site["domain_frequency"] == {"code": [1.0, 0.0, 0.0, 0.0], "prose": [0.0, 1.0, 0.0, 0.0]}
    entropy = -(probs * probs.log()).sum(-1).mean().item()
    assert abs(site["entropy"] - entropy) <= 1e-6
    assert metrics.summary()["sites"][0]["tokens"] == 0  # summary resets
    assert max_violation(torch.tensor([3, 3, 3])) == 0.0


# ---------------------------------------------------------------------------------------------
# bad options
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_experts": 4, "top_k": 5}, "top_k=5 exceeds num_experts=4"),
        ({"num_experts": 6, "top_k": 2, "ep_size": 4}, "ep_size=4 must divide num_experts=6"),
        ({"num_experts": 8, "top_k": 2, "chain_iterations": 3}, "chain_iterations=3 must divide top_k=2"),
        ({"num_experts": 8, "top_k": 3, "chain_iterations": 2}, "must divide top_k=3"),
        ({"num_experts": 8, "top_k": 2, "router": "mlp"}, "router='mlp'"),
        ({"num_experts": 8, "top_k": 2, "balance": "batch"}, "balance='batch'"),
    ],
)
def test_bad_layer_options_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MoELayer(8, 8, **kwargs)


def test_ep_size_above_one_needs_a_process_group():
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        MoELayer(8, 8, num_experts=4, top_k=2, ep_size=2)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("top_k", 9, "moe.top_k"),
        ("ep_size", 3, "moe.ep_size"),
        ("chain_iterations", 4, "moe.chain_iterations"),
        ("balance_coef", -1.0, "moe.balance_coef"),
    ],
)
def test_bad_moe_config_names_the_field(field, value, match):
    moe = MoEConfig(num_experts=8, top_k=2)
    setattr(moe, field, value)
    with pytest.raises(ConfigError, match=match):
        build_model(_tiny(), ParallelConfig(), moe)


@pytest.mark.parametrize("balance", ["micro", "sequence", "global"])
def test_balance_and_metrics_stay_on_the_routing_device(balance):
    """On the ``meta`` device: a CPU tensor made by the tracker or the metrics would fail to mix
    with the routing's, and a host read would raise (meta tensors hold no values)."""
    meta = torch.device("meta")
    metrics = RoutingMetrics(num_sites=2, num_experts=4, domain_names=("a", "b"))
    tracker = BalanceTracker(num_experts=4, top_k=2, num_sites=2, balance=balance, z_loss_coef=1e-3, metrics=metrics)
    logits = torch.empty(6, 4, device=meta, requires_grad=True)
    long = {"dtype": torch.long, "device": meta}
    tracker.begin_step()
    tracker.begin_microbatch(
        sequence=SequenceLayout(torch.zeros(6, **long), 2),
        domains_T=torch.zeros(6, **long),
        valid_T=torch.ones(6, dtype=torch.bool, device=meta),
    )
    for site in range(2):
        tracker.record(site, route_topk(logits, 2))
    loss = tracker.result().share(tokens=12.0, sequences=3.0)
    assert loss.device == meta and tracker.buffer_counts_SE.device == meta
    loss.backward()
    assert logits.grad.device == meta and metrics.stats().device == meta


def test_layer_runs_under_bf16_autocast():
    """Experts compute in bf16 under autocast; the combine keeps the residual stream's dtype."""
    torch.manual_seed(0)
    layer = MoELayer(8, 12, num_experts=4, top_k=2)
    x = torch.randn(5, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = layer(x)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
