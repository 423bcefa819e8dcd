"""LASP-2H (``allgather_attention``) against the single-device softmax reference.

1. fp64 in-process simulation of W ranks: each rank's queries go through
   ``allgather_attention_local`` with the concatenated K/V (shared leaves, so autograd sums the
   K/V gradients over ranks exactly as the reduce-scatter does).
2. Real gloo runs on 2-4 processes in fp32: every rank builds the full seeded inputs, computes
   the fp64 reference itself and compares its shard of the output and of every gradient of the
   global loss sum_r <o_r, g_r>; the CommMeter counts must equal the analytic volume.
3. Bad inputs raise ValueError naming the problem, on every rank (no hang).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from parallel import comm
from parallel.context import ParallelContext
from parallel.softmax_sp import allgather_attention, allgather_attention_local
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
# fp32 over gloo vs the fp64 reference: fp32 rounding (~6e-8) grown by the softmax sums; each
# rank's shard error is divided by the norm of the whole reference tensor (tests/attention_cases)
GLOO_TOL = 1e-5
# bf16 inputs carry 2^-9 relative rounding; the softmax itself runs in fp32
BF16_TOL = 2e-2
# the agreement check gathers 12 int64 per rank (flag + 11 fingerprint fields)
AGREEMENT_BYTES = 12 * 8
SIM_WORLDS = [1, 2, 3, 4, 7]
GLOO_WORLDS = [2, 3, 4]


@dataclass(frozen=True)
class Case:
    T: int  # local tokens per rank
    q_heads: int
    kv_heads: int
    head_dim: int
    v_dim: int
    causal: bool = True
    docs: str | None = None
    batch: int = 1

    def shapes(self, world: int) -> dict[str, tuple[int, ...]]:
        N = world * self.T
        return {
            "q": (self.batch, N, self.q_heads, self.head_dim),
            "k": (self.batch, N, self.kv_heads, self.head_dim),
            "v": (self.batch, N, self.kv_heads, self.v_dim),
            "g": (self.batch, N, self.q_heads, self.v_dim),
        }


CASES = {
    "causal": Case(T=5, q_heads=2, kv_heads=2, head_dim=8, v_dim=8, batch=2),
    "bidirectional": Case(T=5, q_heads=2, kv_heads=2, head_dim=8, v_dim=8, causal=False, batch=2),
    "gqa-4-2-odd-dims": Case(T=3, q_heads=4, kv_heads=2, head_dim=5, v_dim=7),
    "gqa-4-1-bidir": Case(T=4, q_heads=4, kv_heads=1, head_dim=3, v_dim=6, causal=False),
    "docs-inside": Case(T=6, q_heads=2, kv_heads=1, head_dim=4, v_dim=4, docs="inside"),
    "docs-on-cut": Case(T=4, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, docs="on_cut"),
    "docs-span3": Case(T=3, q_heads=4, kv_heads=2, head_dim=4, v_dim=4, docs="span3"),
    "docs-span3-bidir": Case(T=3, q_heads=2, kv_heads=2, head_dim=4, v_dim=4, causal=False, docs="span3"),
    "docs-many-bidir-gqa": Case(T=7, q_heads=4, kv_heads=2, head_dim=3, v_dim=5, causal=False, docs="many"),
    "T1-docs-many": Case(T=1, q_heads=2, kv_heads=1, head_dim=4, v_dim=4, docs="many"),
    "T2-docs-inside-bidir": Case(T=2, q_heads=2, kv_heads=2, head_dim=7, v_dim=3, causal=False, docs="inside"),
    "T3-docs-many": Case(T=3, q_heads=3, kv_heads=1, head_dim=9, v_dim=2, docs="many"),
}


def _inputs(case: Case, world: int) -> tuple[dict[str, torch.Tensor], list[int] | None]:
    tensors = {name: seeded(name, (case, world), shape) for name, shape in case.shapes(world).items()}
    return tensors, doc_bounds(case.docs, world, case.T)


def _reference(tensors, case: Case, bounds) -> tuple[torch.Tensor, ...]:
    inputs = tuple(tensors[n].clone().requires_grad_() for n in "qkv")
    out = reference_softmax_attention(*inputs, causal=case.causal, bounds=bounds)
    return output_and_grads(out, inputs, tensors["g"])


# ---------------------------------------------------------------------------------------------
# fp64 in-process simulation
# ---------------------------------------------------------------------------------------------


def _simulate(q, k, v, *, world: int, case: Case, bounds) -> torch.Tensor:
    outs = [
        allgather_attention_local(q_r, k, v, q_offset=r * case.T, causal=case.causal, cu_seqlens=cu_tensor(bounds))
        for r, q_r in enumerate(q.split(case.T, dim=1))
    ]
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("world", SIM_WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_simulated_ranks_match_reference(name, world):
    case = CASES[name]
    tensors, bounds = _inputs(case, world)
    expected = _reference(tensors, case, bounds)
    inputs = tuple(tensors[n].clone().requires_grad_() for n in "qkv")
    out = _simulate(*inputs, world=world, case=case, bounds=bounds)
    got = output_and_grads(out, inputs, tensors["g"])
    for label, a, b in zip(("o", "dq", "dk", "dv"), got, expected):
        assert rel_err(a, b) <= SIM_TOL, (label, rel_err(a, b))


def test_bf16_keeps_a_float32_softmax():
    case = CASES["docs-many-bidir-gqa"]
    tensors, bounds = _inputs(case, 3)
    expected = reference_softmax_attention(*(tensors[n] for n in "qkv"), causal=False, bounds=bounds)
    q, k, v = (tensors[n].bfloat16() for n in "qkv")
    out = _simulate(q, k, v, world=3, case=case, bounds=bounds)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, expected) <= BF16_TOL


def test_solo_group_is_local_attention_and_free():
    case = CASES["docs-inside"]
    tensors, bounds = _inputs(case, 1)
    q, k, v = (tensors[n] for n in "qkv")
    with comm.CommMeter() as meter:
        out = allgather_attention(q, k, v, group=comm.SOLO, cu_seqlens=cu_tensor(bounds))
    assert meter.summary() == {}
    assert rel_err(out, reference_softmax_attention(q, k, v, causal=True, bounds=bounds)) <= SIM_TOL


def test_explicit_scale():
    case = CASES["gqa-4-2-odd-dims"]
    tensors, _ = _inputs(case, 2)
    q, k, v = (tensors[n] for n in "qkv")
    out = torch.cat(
        [allgather_attention_local(q_r, k, v, q_offset=r * 3, scale=0.7) for r, q_r in enumerate(q.split(3, dim=1))],
        dim=1,
    )
    assert rel_err(out, reference_softmax_attention(q, k, v, causal=True, bounds=None, scale=0.7)) <= SIM_TOL


# ---------------------------------------------------------------------------------------------
# Real gloo ranks
# ---------------------------------------------------------------------------------------------


def _run_allgather(ctx: ParallelContext, case: Case):
    W, r = ctx.world_size, ctx.rank
    tensors, bounds = _inputs(case, W)
    expected = _reference(tensors, case, bounds)

    def shard(t: torch.Tensor) -> torch.Tensor:
        return t.split(case.T, dim=1)[r]

    inputs = tuple(shard(tensors[n]).float().requires_grad_() for n in "qkv")
    with comm.CommMeter() as meter:
        out = allgather_attention(*inputs, group=ctx.world, causal=case.causal, cu_seqlens=cu_tensor(bounds))
        got = output_and_grads(out, inputs, shard(tensors["g"]).float())
    labels = ("o", "dq", "dk", "dv")
    errors = {label: rel_err(a, shard(b), norm=b.norm().item()) for label, a, b in zip(labels, got, expected)}
    return errors, meter.summary()


def _expected_bytes(case: Case, world: int) -> dict[str, dict[str, int]]:
    kv_bytes = case.batch * case.T * case.kv_heads * (case.head_dim + case.v_dim) * 4
    gathered = (world - 1) * (kv_bytes + AGREEMENT_BYTES)
    scattered = (world - 1) * kv_bytes
    return {
        "all_gather": {"calls": 2, "bytes_sent": gathered, "bytes_received": gathered},
        "reduce_scatter": {"calls": 1, "bytes_sent": scattered, "bytes_received": scattered},
    }


@pytest.mark.parametrize("world", GLOO_WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_gloo_ranks_match_reference(name, world):
    case = CASES[name]
    for rank, (errors, summary) in enumerate(run_on_ranks(world, _run_allgather, case)):
        for label, err in errors.items():
            assert err <= GLOO_TOL, (rank, label, err)
        assert summary == _expected_bytes(case, world), rank


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def _qkv(T=4, q_heads=2, kv_heads=1, head_dim=4, v_dim=4, batch=1):
    shapes = Case(T, q_heads, kv_heads, head_dim, v_dim, batch=batch).shapes(1)
    return [torch.randn(shapes[n]) for n in "qkv"]


def _with(index: int, replacement):
    qkv = _qkv()
    qkv[index] = replacement
    return qkv


BAD_INPUTS = {
    "q rank 3": (_with(0, torch.randn(1, 4, 8)), {}, "q must be rank-4"),
    "k not a tensor": (_with(1, [1.0]), {}, "k must be a torch.Tensor"),
    "integer v": (_with(2, torch.ones(1, 4, 1, 4, dtype=torch.long)), {}, "v must have a floating dtype"),
    "k dtype": (_with(1, torch.randn(1, 4, 1, 4, dtype=torch.float64)), {}, "k must have the same dtype as q"),
    "v device": (_with(2, torch.randn(1, 4, 1, 4, device="meta")), {}, "v must be on the same device as q"),
    "k/v heads differ": (_with(2, torch.randn(1, 4, 2, 4)), {}, "k and v must have the same [batch, tokens, heads]"),
    "batch": (_with(0, torch.randn(2, 4, 2, 4)), {}, "k must have the same batch as q"),
    "tokens": (_with(0, torch.randn(1, 5, 2, 4)), {}, "same local tokens as q"),
    "head dim": (_with(0, torch.randn(1, 4, 2, 5)), {}, "k must have the same head dim as q"),
    "gqa heads": (_qkv(q_heads=3, kv_heads=2), {}, "q heads (3) must be a multiple of k/v heads (2)"),
    "no tokens": (_qkv(T=0), {}, "at least one token"),
    "cu 2-D": (_qkv(), {"cu_seqlens": torch.tensor([[0, 4]])}, "cu_seqlens must be 1-D"),
    "cu float": (_qkv(), {"cu_seqlens": torch.tensor([0.0, 4.0])}, "cu_seqlens must have an integer dtype"),
    "cu start": (_qkv(), {"cu_seqlens": torch.tensor([1, 4])}, "cu_seqlens must start at 0"),
    "cu order": (_qkv(), {"cu_seqlens": torch.tensor([0, 2, 2, 4])}, "strictly increasing"),
    "cu end": (_qkv(), {"cu_seqlens": torch.tensor([0, 3])}, "must end at the packed sequence's length 4"),
    "cu short": (_qkv(), {"cu_seqlens": torch.tensor([0])}, "at least 2 entries"),
    "cu batch": (_qkv(batch=2), {"cu_seqlens": torch.tensor([0, 4])}, "cu_seqlens requires batch size 1"),
    "scale": (_qkv(), {"scale": float("nan")}, "scale must be a finite number"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_inputs_raise(name):
    qkv, kwargs, message = BAD_INPUTS[name]
    with pytest.raises(ValueError) as info:
        allgather_attention(*qkv, group=comm.SOLO, **kwargs)
    assert message in str(info.value)
    assert str(info.value).startswith("allgather_attention: ")


@pytest.mark.parametrize("q_offset", [-1, 2, 1.0, True])
def test_local_rejects_bad_q_offset(q_offset):
    q = _qkv(T=3)[0]
    _, k_full, v_full = _qkv(T=4)
    with pytest.raises(ValueError, match=r"q_offset must be an int in \[0, 1\]"):
        allgather_attention_local(q, k_full, v_full, q_offset=q_offset)


def _run_mismatches(ctx: ParallelContext):
    """Calls that must fail on every rank, then a valid one (the ranks stay in step)."""
    r, N, group = ctx.rank, 2 * ctx.world_size, ctx.world
    q, k, v = _qkv(T=2)
    calls = {
        "cu differs": lambda: allgather_attention(q, k, v, group=group, cu_seqlens=torch.tensor([0, 1 + r, N])),
        "cu invalid on rank 1": lambda: allgather_attention(
            q, k, v, group=group, cu_seqlens=torch.tensor([int(r == 1), N])
        ),
        "causal differs": lambda: allgather_attention(q, k, v, group=group, causal=r == 0),
        "tokens differ": lambda: allgather_attention(*_qkv(T=2 + r), group=group),
    }
    messages = {}
    for label, call in calls.items():
        try:
            call()
            messages[label] = None
        except ValueError as exc:
            messages[label] = str(exc)
    out = allgather_attention(q, k, v, group=group, cu_seqlens=torch.tensor([0, 1, N]))
    return messages, out.shape


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_rank_mismatch_raises_on_every_rank(world):
    results = run_on_ranks(world, _run_mismatches, timeout_s=60)
    for rank, (messages, shape) in enumerate(results):
        assert shape == (1, 2, 2, 4)
        assert "disagree on cu_seqlens checksum" in messages["cu differs"], messages
        if rank == 1:
            assert "cu_seqlens must start at 0" in messages["cu invalid on rank 1"]
        else:
            assert "invalid inputs on group rank(s) [1]" in messages["cu invalid on rank 1"]
        assert "disagree on causal" in messages["causal differs"]
        assert "disagree on local tokens" in messages["tokens differ"]
