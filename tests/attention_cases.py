"""Shared pieces of the sequence-parallel attention tests: seeded inputs, packed-document
layouts and an independent single-device softmax reference.

The reference builds the full ``[N, N]`` mask from global positions and document ids and runs
a plain fp64 softmax, with GQA by ``repeat_interleave``: it shares no code with the ops under
test (no SDPA, no key windows, no fingerprints).
"""

from __future__ import annotations

import math
import random
import zlib

import torch
from torch import Tensor

DOC_LAYOUTS = ("inside", "on_cut", "span3", "many")


def rel_err(a: Tensor, b: Tensor, *, norm: float | None = None) -> float:
    """``|a - b| / norm`` in fp64, ``norm`` defaulting to ``|b|`` (absolute error when it is 0).

    A rank's shard of a gradient can be exactly zero (the decay of a document's first token acts
    on a zero state), so shards are measured against the norm of the whole reference tensor.
    """
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (a.shape, b.shape)
    denom = b.norm().item() if norm is None else norm
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def seeded(kind: str, key: object, shape: tuple[int, ...], *, scale: float = 1.0) -> Tensor:
    """fp64 normal tensor from a seed that is stable across processes (str hashes are not)."""
    seed = zlib.crc32(repr((kind, key, shape)).encode())
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def doc_bounds(layout: str | None, world: int, local_tokens: int) -> list[int] | None:
    """Document boundaries ``[0, ..., W*T]`` of a packed sequence, by layout:

    * ``inside``: boundaries strictly inside the first and the last rank (when T >= 2);
    * ``on_cut``: boundaries exactly on the rank cuts after ranks 0 and 2;
    * ``span3``: a document from inside rank 0 to inside rank 2 (spanning three ranks);
    * ``many``: seeded random lengths 1..T+1, so boundaries fall anywhere.
    """
    if layout is None:
        return None
    T, N = local_tokens, world * local_tokens
    half = max(1, T // 2)
    if layout == "inside":
        cuts = {half, (world - 1) * T + half}
    elif layout == "on_cut":
        cuts = {T, 3 * T}
    elif layout == "span3":
        cuts = {half, half + 2 * T + 1}
    elif layout == "many":
        rng = random.Random(zlib.crc32(repr((world, T)).encode()))
        cuts, pos = set(), 0
        while pos < N:
            pos += rng.randint(1, T + 1)
            cuts.add(pos)
    else:
        raise ValueError(f"unknown document layout {layout!r}")
    return [0, *sorted(c for c in cuts if 0 < c < N), N]


def cu_tensor(bounds: list[int] | None) -> Tensor | None:
    return None if bounds is None else torch.tensor(bounds, dtype=torch.int64)


def reference_softmax_attention(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, bounds: list[int] | None, scale: float | None = None
) -> Tensor:
    """Single-device softmax attention over the whole sequence ``[B, N, H, D]``, in fp64."""
    q, k, v = q.double(), k.double(), v.double()
    N, num_heads, head_dim = q.shape[1:]
    group = num_heads // k.shape[2]
    k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    pos = torch.arange(N)
    doc = torch.zeros(N, dtype=torch.long)
    for boundary in (bounds or [0, N])[1:-1]:
        doc[boundary:] += 1
    visible = doc[:, None] == doc[None, :]
    if causal:
        visible = visible & (pos[None, :] <= pos[:, None])
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    return torch.einsum("bhij,bjhe->bihe", probs, v)


def output_and_grads(out: Tensor, inputs: tuple[Tensor, ...], grad_out: Tensor) -> tuple[Tensor, ...]:
    """``(out, d<out, grad_out>/d input for each input)``."""
    grads = torch.autograd.grad(out, inputs, grad_out)
    return (out.detach(), *grads)
