"""Ulysses (all-to-all) softmax and linear attention against single-device references.

1. fp64 in-process simulation of W ranks: the all-to-alls are emulated by slicing heads and
   concatenating tokens, and each simulated rank runs the single-device kernel on its heads
   (``allgather_attention_local`` at offset 0, ``chunk_linear_attention``), with the k/v head
   repetition of ``kv_head_repeats``.
2. Real gloo runs on 2-4 processes in fp32: every rank compares its shard of the output and of
   every gradient (q, k, v, log-decay) of the global loss sum_r <o_r, g_r> with the fp64
   reference; a per-head log-decay is replicated, so its gradients sum over the ranks to the
   reference. The CommMeter counts must equal the all-to-all formula.
3. Bad inputs raise ValueError naming the problem, on every rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from parallel import comm
from parallel.context import ParallelContext
from parallel.linear_attention import chunk_linear_attention, linear_attention
from parallel.softmax_sp import allgather_attention_local
from parallel.ulysses import kv_head_repeats, ulysses_attention, ulysses_linear_attention
from tests.attention_cases import (
    cu_tensor,
    doc_bounds,
    output_and_grads,
    reference_softmax_attention,
    rel_err,
    seeded,
)
from tests.distributed import run_on_ranks

# fp64 simulation vs fp64 reference: only the summation order differs (~1e-15)
SIM_TOL = 1e-10
# fp32 over gloo vs the fp64 reference: fp32 rounding (~6e-8) grown by the softmax / state sums;
# each rank's shard error is divided by the norm of the whole reference tensor (a shard of the
# decay gradient can be exactly zero: see tests/attention_cases.rel_err)
GLOO_TOL = 1e-5
# the agreement check gathers 12 int64 per rank (flag + 11 fingerprint fields)
AGREEMENT_BYTES = 12 * 8
SIM_WORLDS = [1, 2, 3, 4, 7]
GLOO_WORLDS = [2, 3, 4]
GRAD_LABELS = ("o", "dq", "dk", "dv", "d_log_decay")


@dataclass(frozen=True)
class Case:
    T: int  # local tokens per rank
    q_heads: int  # multiplied by W / gcd(q_heads, W) when W does not divide it
    kv_heads: int  # scaled with q_heads when equal to it (multi-head), else fixed (GQA)
    head_dim: int
    v_dim: int
    causal: bool = True
    docs: str | None = None
    batch: int = 1
    decay: str | None = None  # linear only: None, "head" [H] or "token" [B, T, H]

    def heads(self, world: int) -> tuple[int, int]:
        q_heads = self.q_heads * world // math.gcd(self.q_heads, world)
        return q_heads, (q_heads if self.kv_heads == self.q_heads else self.kv_heads)

    def shapes(self, world: int) -> dict[str, tuple[int, ...]]:
        N, (H, H_kv) = world * self.T, self.heads(world)
        shapes = {
            "q": (self.batch, N, H, self.head_dim),
            "k": (self.batch, N, H_kv, self.head_dim),
            "v": (self.batch, N, H_kv, self.v_dim),
            "g": (self.batch, N, H, self.v_dim),
        }
        if self.decay is not None:
            shapes["log_decay"] = (H,) if self.decay == "head" else (self.batch, N, H)
        return shapes


SOFTMAX_CASES = {
    "causal": Case(T=5, q_heads=4, kv_heads=4, head_dim=8, v_dim=8, batch=2),
    "bidirectional": Case(T=5, q_heads=4, kv_heads=4, head_dim=8, v_dim=8, causal=False, batch=2),
    "gqa-4-2-odd-dims": Case(T=3, q_heads=4, kv_heads=2, head_dim=5, v_dim=7),
    "gqa-4-1-bidir": Case(T=4, q_heads=4, kv_heads=1, head_dim=3, v_dim=6, causal=False),
    "gqa-6-3": Case(T=2, q_heads=6, kv_heads=3, head_dim=4, v_dim=4),
    "docs-inside": Case(T=6, q_heads=4, kv_heads=2, head_dim=4, v_dim=4, docs="inside"),
    "docs-on-cut": Case(T=4, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, docs="on_cut"),
    "docs-span3-bidir": Case(T=3, q_heads=4, kv_heads=1, head_dim=4, v_dim=4, causal=False, docs="span3"),
    "T1-docs-many": Case(T=1, q_heads=4, kv_heads=2, head_dim=4, v_dim=4, docs="many"),
    "T2-docs-span3": Case(T=2, q_heads=2, kv_heads=1, head_dim=7, v_dim=3, docs="span3"),
}

LINEAR_CASES = {
    "causal": Case(T=5, q_heads=4, kv_heads=4, head_dim=8, v_dim=8, batch=2),
    "bidirectional": Case(T=5, q_heads=4, kv_heads=4, head_dim=8, v_dim=8, causal=False, batch=2),
    "head-decay-odd-dims": Case(T=3, q_heads=2, kv_heads=2, head_dim=5, v_dim=3, decay="head", batch=2),
    "token-decay-bidir": Case(T=4, q_heads=2, kv_heads=2, head_dim=4, v_dim=6, causal=False, decay="token"),
    "docs-inside-token-decay": Case(T=6, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, docs="inside", decay="token"),
    "docs-on-cut-head-decay": Case(T=4, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, docs="on_cut", decay="head"),
    "docs-span3-bidir": Case(T=3, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, causal=False, docs="span3"),
    "T1-docs-many-token-decay": Case(T=1, q_heads=2, kv_heads=2, head_dim=3, v_dim=4, docs="many", decay="token"),
    "T2-docs-many-head-decay": Case(T=2, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, docs="many", decay="head"),
}


def _inputs(case: Case, world: int) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    tensors = {name: seeded(name, (case, world), shape) for name, shape in case.shapes(world).items()}
    if "log_decay" in tensors:
        # log-decays <= 0, mild enough that the state carries across ranks and documents
        tensors["log_decay"] = -0.4 * tensors["log_decay"].abs()
    return tensors, doc_bounds(case.docs, world, case.T)


def _names(case: Case) -> tuple[str, ...]:
    return ("q", "k", "v") if case.decay is None else ("q", "k", "v", "log_decay")


def _softmax_reference(tensors, case: Case, bounds) -> tuple[torch.Tensor, ...]:
    inputs = tuple(tensors[n].clone().requires_grad_() for n in "qkv")
    out = reference_softmax_attention(*inputs, causal=case.causal, bounds=bounds)
    return output_and_grads(out, inputs, tensors["g"])


def _linear_reference(tensors, case: Case, bounds) -> tuple[torch.Tensor, ...]:
    inputs = tuple(tensors[n].clone().requires_grad_() for n in _names(case))
    decay = inputs[3] if case.decay else None
    out = linear_attention(*inputs[:3], causal=case.causal, log_decay=decay, cu_seqlens=cu_tensor(bounds))
    return output_and_grads(out, inputs, tensors["g"])


# ---------------------------------------------------------------------------------------------
# fp64 in-process simulation
# ---------------------------------------------------------------------------------------------


def _seq_to_heads(shards: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    """Rank j receives head block j of every rank's shard, concatenated in rank (token) order."""
    return [torch.cat([x.chunk(world, dim=2)[j] for x in shards], dim=1) for j in range(world)]


def _heads_to_seq(parts: list[torch.Tensor], world: int) -> list[torch.Tensor]:
    return [torch.cat([p.chunk(world, dim=1)[r] for p in parts], dim=2) for r in range(world)]


def _simulate_softmax(q, k, v, *, world: int, case: Case, bounds) -> torch.Tensor:
    repeats = kv_head_repeats(q.shape[2], k.shape[2], world)
    k, v = k.repeat_interleave(repeats, dim=2), v.repeat_interleave(repeats, dim=2)
    q_h, k_h, v_h = (_seq_to_heads(list(t.split(case.T, dim=1)), world) for t in (q, k, v))
    cu = cu_tensor(bounds)
    outs = [
        allgather_attention_local(*qkv, q_offset=0, causal=case.causal, cu_seqlens=cu) for qkv in zip(q_h, k_h, v_h)
    ]
    return torch.cat(_heads_to_seq(outs, world), dim=1)


def _simulate_linear(q, k, v, log_decay=None, *, world: int, case: Case, bounds) -> torch.Tensor:
    q_h, k_h, v_h = (_seq_to_heads(list(t.split(case.T, dim=1)), world) for t in (q, k, v))
    if log_decay is None:
        decays = [None] * world
    elif log_decay.dim() == 1:
        decays = list(log_decay.chunk(world))
    else:
        decays = _seq_to_heads(list(log_decay.split(case.T, dim=1)), world)
    cu = cu_tensor(bounds)
    outs = [
        chunk_linear_attention(*qkv, causal=case.causal, log_decay=a, cu_seqlens=cu)[0]
        for *qkv, a in zip(q_h, k_h, v_h, decays)
    ]
    return torch.cat(_heads_to_seq(outs, world), dim=1)


def _check_all(got, expected, tol: float) -> None:
    for label, a, b in zip(GRAD_LABELS, got, expected):
        assert rel_err(a, b) <= tol, (label, rel_err(a, b))


@pytest.mark.parametrize("world", SIM_WORLDS)
@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_simulated_softmax_matches_reference(name, world):
    case = SOFTMAX_CASES[name]
    tensors, bounds = _inputs(case, world)
    inputs = tuple(tensors[n].clone().requires_grad_() for n in "qkv")
    out = _simulate_softmax(*inputs, world=world, case=case, bounds=bounds)
    _check_all(output_and_grads(out, inputs, tensors["g"]), _softmax_reference(tensors, case, bounds), SIM_TOL)


@pytest.mark.parametrize("world", SIM_WORLDS)
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_simulated_linear_matches_reference(name, world):
    case = LINEAR_CASES[name]
    tensors, bounds = _inputs(case, world)
    inputs = tuple(tensors[n].clone().requires_grad_() for n in _names(case))
    out = _simulate_linear(*inputs, world=world, case=case, bounds=bounds)
    _check_all(output_and_grads(out, inputs, tensors["g"]), _linear_reference(tensors, case, bounds), SIM_TOL)


@pytest.mark.parametrize(
    "q_heads,kv_heads,world,repeats",
    [(4, 2, 2, 1), (4, 1, 2, 2), (4, 2, 4, 2), (4, 1, 4, 4), (6, 3, 3, 1), (6, 2, 3, 3), (12, 4, 6, 3), (8, 8, 1, 1)],
)
def test_kv_head_repeats(q_heads, kv_heads, world, repeats):
    assert kv_head_repeats(q_heads, kv_heads, world) == repeats
    assert (kv_heads * repeats) % world == 0 and q_heads % (kv_heads * repeats) == 0


def test_solo_group_is_single_device_and_free():
    case = LINEAR_CASES["docs-inside-token-decay"]
    tensors, bounds = _inputs(case, 1)
    q, k, v, a = (tensors[n] for n in _names(case))
    with comm.CommMeter() as meter:
        o_lin = ulysses_linear_attention(q, k, v, group=comm.SOLO, log_decay=a, cu_seqlens=cu_tensor(bounds))
        o_sm = ulysses_attention(q, k, v, group=comm.SOLO, cu_seqlens=cu_tensor(bounds))
    assert meter.summary() == {}
    assert rel_err(o_lin, linear_attention(q, k, v, log_decay=a, cu_seqlens=cu_tensor(bounds))) <= SIM_TOL
    assert rel_err(o_sm, reference_softmax_attention(q, k, v, causal=True, bounds=bounds)) <= SIM_TOL


# ---------------------------------------------------------------------------------------------
# Real gloo ranks
# ---------------------------------------------------------------------------------------------


def _run_ulysses(ctx: ParallelContext, case: Case, linear: bool):
    W, r = ctx.world_size, ctx.rank
    tensors, bounds = _inputs(case, W)
    expected = (_linear_reference if linear else _softmax_reference)(tensors, case, bounds)

    def shard(t: torch.Tensor) -> torch.Tensor:
        # a per-head decay is replicated: every rank holds all of it (and its heads' gradient share)
        return t if t.dim() == 1 else t.split(case.T, dim=1)[r]

    inputs = tuple(shard(tensors[n]).float().requires_grad_() for n in _names(case))
    cu = cu_tensor(bounds)
    with comm.CommMeter() as meter:
        if linear:
            decay = inputs[3] if case.decay else None
            out = ulysses_linear_attention(
                *inputs[:3], group=ctx.world, causal=case.causal, log_decay=decay, cu_seqlens=cu
            )
        else:
            out = ulysses_attention(*inputs, group=ctx.world, causal=case.causal, cu_seqlens=cu)
        got = output_and_grads(out, inputs, shard(tensors["g"]).float())
    errors, head_decay = {}, None
    for label, a, b in zip(GRAD_LABELS, got, expected):
        if b.dim() == 1:
            head_decay = (a, b)  # checked once summed over the ranks
        else:
            errors[label] = rel_err(a, shard(b), norm=b.norm().item())
    return errors, head_decay, meter.summary()


def _all_to_all_bytes(case: Case, world: int, linear: bool) -> int:
    """Bytes one rank sends (= receives) in the forward and backward all-to-alls."""
    H, H_kv = case.heads(world)
    if linear:
        elements = H * (2 * case.head_dim + 2 * case.v_dim) + (H if case.decay == "token" else 0)
    else:
        H_kv = math.lcm(H_kv, world)  # k/v heads repeated until they split evenly
        elements = (H + H_kv) * case.head_dim + (H_kv + H) * case.v_dim
    # every all-to-all keeps 1/W of its tensor local; forward and backward move the same volume
    return 2 * (world - 1) * case.batch * case.T * elements * 4 // world


def _check_gloo(results, case: Case, world: int, linear: bool) -> None:
    num_tensors = 4 + (case.decay == "token")
    expected_meter = {
        "all_to_all": {"calls": 2 * num_tensors, "bytes_sent": _all_to_all_bytes(case, world, linear)},
        "all_gather": {"calls": 1, "bytes_sent": (world - 1) * AGREEMENT_BYTES},
    }
    for kind in expected_meter.values():
        kind["bytes_received"] = kind["bytes_sent"]
    for rank, (errors, _, summary) in enumerate(results):
        for label, err in errors.items():
            assert err <= GLOO_TOL, (rank, label, err)
        assert summary == expected_meter, rank
    if case.decay == "head":
        expected_grad = results[0][1][1]
        assert rel_err(sum(head_decay[0] for _, head_decay, _ in results), expected_grad) <= GLOO_TOL


@pytest.mark.parametrize("world", GLOO_WORLDS)
@pytest.mark.parametrize("name", list(SOFTMAX_CASES))
def test_gloo_softmax_matches_reference(name, world):
    case = SOFTMAX_CASES[name]
    _check_gloo(run_on_ranks(world, _run_ulysses, case, False), case, world, linear=False)


@pytest.mark.parametrize("world", GLOO_WORLDS)
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_gloo_linear_matches_reference(name, world):
    case = LINEAR_CASES[name]
    _check_gloo(run_on_ranks(world, _run_ulysses, case, True), case, world, linear=True)


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _qkv(T=2, heads=(4, 2), head_dim=4):
    q_heads, kv_heads = heads
    return (
        torch.randn(1, T, q_heads, head_dim),
        torch.randn(1, T, kv_heads, head_dim),
        torch.randn(1, T, kv_heads, head_dim),
    )


def _run_bad_inputs(ctx: ParallelContext):
    """Calls that must fail on every rank, then valid ones (the ranks stay in step)."""
    r, N = ctx.rank, 2 * ctx.world_size
    calls = {
        "softmax heads": lambda: ulysses_attention(*_qkv(heads=(3, 1)), group=ctx.world),
        "linear heads": lambda: ulysses_linear_attention(*_qkv(heads=(3, 3)), group=ctx.world),
        "linear k heads": lambda: ulysses_linear_attention(*_qkv(heads=(4, 2)), group=ctx.world),
        "positive decay on rank 1": lambda: ulysses_linear_attention(
            *_qkv(heads=(4, 4)), group=ctx.world, log_decay=torch.full((1, 2, 4), float(r == 1))
        ),
        "decay shape": lambda: ulysses_linear_attention(
            *_qkv(heads=(4, 4)), group=ctx.world, log_decay=torch.zeros(1, N, 4)
        ),
        "softmax cu differs": lambda: ulysses_attention(
            *_qkv(), group=ctx.world, cu_seqlens=torch.tensor([0, 1 + r, N])
        ),
        "linear cu end": lambda: ulysses_linear_attention(
            *_qkv(heads=(4, 4)), group=ctx.world, cu_seqlens=torch.tensor([0, 2])
        ),
        "linear decay kind differs": lambda: ulysses_linear_attention(
            *_qkv(heads=(4, 4)), group=ctx.world, log_decay=torch.zeros(4) if r == 0 else None
        ),
    }
    messages = {}
    for label, call in calls.items():
        try:
            call()
            messages[label] = None
        except ValueError as exc:
            messages[label] = str(exc)
    shapes = (
        ulysses_attention(*_qkv(), group=ctx.world).shape,
        ulysses_linear_attention(*_qkv(heads=(4, 4)), group=ctx.world).shape,
    )
    return messages, shapes


def test_gloo_bad_inputs_raise_on_every_rank():
    for rank, (messages, shapes) in enumerate(run_on_ranks(2, _run_bad_inputs, timeout_s=60)):
        assert shapes == ((1, 2, 4, 4), (1, 2, 4, 4))
        assert "ulysses_attention: " in messages["softmax heads"]
        assert "q has 3 heads, which the group size 2 does not divide" in messages["softmax heads"]
        assert "q/k/v have 3 heads, which the group size 2 does not divide" in messages["linear heads"]
        assert "k must have the same [batch, tokens, heads] as q" in messages["linear k heads"]
        if rank == 1:
            assert "log_decay must be <= 0" in messages["positive decay on rank 1"]
        else:
            assert "invalid inputs on group rank(s) [1]" in messages["positive decay on rank 1"]
        assert "log_decay must have shape" in messages["decay shape"]
        assert "disagree on cu_seqlens checksum" in messages["softmax cu differs"]
        assert "cu_seqlens must end at the packed sequence's length 4" in messages["linear cu end"]
        assert "disagree on log_decay kind" in messages["linear decay kind differs"]
