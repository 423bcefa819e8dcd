"""Per-document softmax attention: each query block attends only to the keys it can see.

The local compute of LASP-2H and Ulysses. T queries sit at global positions
``[q_offset, q_offset + T)`` of a packed sequence whose S keys/values are all given; ``bounds``
are the documents' boundaries ``[0, ..., S]`` (None: one document). Query p sees key j when
``doc(j) == doc(p)`` and, if causal, ``j <= p``. The queries split into *pieces*, one per
document they touch::

    piece d: queries [max(a_d, q_offset), min(b_d, q_offset + T))  keys [a_d, key_end_d)
    key_end_d = end of the piece's queries (causal) or b_d (bidirectional)

so a causal piece's mask is aligned bottom-right (its keys start at the document's start, its
queries possibly later), and the work is Σ_d (piece queries × piece keys) instead of
T × (visible window) for one mask over the packed window. Pieces tile the queries in order and
their keys tile the key window ``[lo, hi)`` in order, which is what flash-attn's varlen kernel
takes (``cu_seqlens_q``, ``cu_seqlens_k``).

Backends (``backend="auto"`` takes the first that applies):

* ``"flash"``: flash-attn's ``flash_attn_varlen_func`` (CUDA, fp16/bf16, equal q/v head dims
  <= 256 and a multiple of 8); its causal mask is bottom-right aligned (flash-attn >= 2.1) and
  it takes GQA natively.
* ``"flex"``: torch ``flex_attention`` (CUDA) with a document block mask, compiled once.
* ``"sdpa"``: torch SDPA per piece (see :func:`_sdpa_plan`). A piece whose queries are its whole
  document (every document that starts inside the block) is a square causal block: a run of
  consecutive documents of one length is one call on a reshaped view (no copy); other documents
  of at least SOLO_MIN tokens run alone on split views; shorter single ones are batched by
  similar length, right-padded (causal: padded keys lie after every real query, so
  ``is_causal`` hides them; bidirectional: a key-padding mask) and run in one call per bucket.
  At most one piece per block starts before the block (its document began on an earlier rank).
  On CPU with equal q/v head dims it runs as its keys before the block (a rectangle every query
  sees: no mask) plus the block's own keys (a causal square), merged by log-sum-exp
  (:class:`_SplitPiece`, the CPU flash kernel called directly); otherwise under an explicit
  bottom-right mask of that piece's size.

GQA: k/v keep their H_kv heads. With ``is_causal`` SDPA's ``enable_gqa`` shares them (the CPU
and CUDA flash kernels read the shared head, no copy); where a mask is needed the G query heads
of a k/v group are folded into the query axis instead (``softmax_sp._grouped_sdpa``'s trick).
Everything here is computed from host ints (bounds, offsets): no device value is read back. The
index tensors of a layout (cu_seqlens, block masks, bucket gathers) are built once and cached
(small LRU keyed by the pieces and device), so the layers of a micro-batch copy nothing to the
device after the first.
"""

from __future__ import annotations

import bisect
import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["BACKENDS", "Piece", "doc_attention", "document_pieces", "piece_work", "select_backend"]

BACKENDS = ("auto", "flash", "flex", "sdpa")
# square pieces of lengths in [BUCKET_RATIO * L, L] share one padded SDPA call (padding waste
# <= 1/0.9^2 = 1.23x on the shortest), and so do any lengths within BUCKET_SLACK tokens, where
# the per-call overhead outweighs the padded work
BUCKET_RATIO = 0.9
BUCKET_SLACK = 64
# square pieces at least this long run by themselves on views (measured on CPU: gathering
# documents of 64-2,048 tokens into padded buckets cost more in copies than it saved in calls);
# shorter ones that are not part of an equal-length run are gathered into buckets
SOLO_MIN = 64
# the CPU flash kernel SDPA dispatches to, called directly where the log-sum-exp is needed
_FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
_FLASH_CPU_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class Piece:
    """Queries ``[q0, q1)`` (rows of the local block) attending keys ``[k0, k1)`` (rows of k/v)."""

    q0: int
    q1: int
    k0: int
    k1: int

    @property
    def square(self) -> bool:
        """Whether the queries are exactly the keys (given the block's offset)."""
        return self.k1 - self.k0 == self.q1 - self.q0


def document_pieces(q_offset: int, T: int, S: int, *, causal: bool, bounds: list[int] | None) -> list[Piece]:
    """The pieces of the query block ``[q_offset, q_offset + T)``, in order (see the module docstring)."""
    bounds = [0, S] if bounds is None else bounds
    first, end = q_offset, q_offset + T
    pieces = []
    for d in range(bisect.bisect_right(bounds, first) - 1, len(bounds) - 1):
        a, b = bounds[d], bounds[d + 1]
        if a >= end:
            break
        qs, qe = max(a, first), min(b, end)
        pieces.append(Piece(qs - q_offset, qe - q_offset, a, qe if causal else b))
    return pieces


def piece_work(pieces: list[Piece]) -> int:
    """Σ piece queries × piece keys: the score entries the per-document kernels compute."""
    return sum((p.q1 - p.q0) * (p.k1 - p.k0) for p in pieces)


# ----------------------------------------------------------------------------- backend choice


@functools.cache
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # a flash-attn built for another torch/CUDA fails at import: not available
        return None
    return flash_attn_varlen_func


@functools.cache
def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    # compiled once per process; flex_attention is only fast compiled
    return create_block_mask, torch.compile(flex_attention, dynamic=True)


def _flash_fits(q: Tensor, v: Tensor) -> bool:
    D = q.shape[3]
    return q.dtype in (torch.float16, torch.bfloat16) and v.shape[3] == D and D <= 256 and D % 8 == 0


def select_backend(q: Tensor, v: Tensor, backend: str = "auto") -> str:
    """The backend ``doc_attention`` runs for these inputs; ValueError for one that cannot run them."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: allowed {', '.join(BACKENDS)}")
    cuda = q.device.type == "cuda"
    if backend == "auto":
        if cuda and _flash_varlen() is not None and _flash_fits(q, v):
            return "flash"
        return "flex" if cuda and _flex() is not None else "sdpa"
    if backend == "flash" and not (cuda and _flash_varlen() is not None and _flash_fits(q, v)):
        raise ValueError(
            "backend='flash' needs CUDA tensors, flash-attn installed, fp16/bf16 and equal q/v head dims <= 256 "
            "divisible by 8: use backend='auto'"
        )
    if backend == "flex" and not (cuda and _flex() is not None):
        raise ValueError("backend='flex' needs CUDA tensors and torch.nn.attention.flex_attention: use backend='auto'")
    return backend


# ----------------------------------------------------------------------------- CUDA kernels


@functools.lru_cache(maxsize=32)
def _flash_plan(pieces: tuple[Piece, ...], batch: int, device: torch.device) -> tuple[Tensor, Tensor, int, int]:
    """cu_seqlens_q / cu_seqlens_k (int32, on the device) and the longest piece, once per layout."""
    q_lens = [p.q1 - p.q0 for p in pieces] * batch
    k_lens = [p.k1 - p.k0 for p in pieces] * batch
    cu_q = torch.tensor([0, *_cumsum(q_lens)], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *_cumsum(k_lens)], dtype=torch.int32, device=device)
    return cu_q, cu_k, max(q_lens), max(k_lens)


def _flash_attention(q: Tensor, k: Tensor, v: Tensor, pieces: list[Piece], *, causal: bool, scale: float) -> Tensor:
    """flash-attn varlen over the pieces: queries are the block as is, keys the window ``[lo, hi)``."""
    B, T = q.shape[:2]
    lo, hi = pieces[0].k0, pieces[-1].k1
    cu_q, cu_k, max_q, max_k = _flash_plan(tuple(pieces), B, q.device)
    o = _flash_varlen()(
        q.reshape(B * T, *q.shape[2:]),
        k[:, lo:hi].reshape(B * (hi - lo), *k.shape[2:]),
        v[:, lo:hi].reshape(B * (hi - lo), *v.shape[2:]),
        cu_q,
        cu_k,
        max_q,
        max_k,
        softmax_scale=scale,
        causal=causal,
    )
    return o.view(B, T, *o.shape[1:])


def _document_mask_mod(q_doc_T: Tensor, q_pos_T: Tensor, k_doc_S: Tensor, k_pos_S: Tensor, causal: bool):
    # closes over tensors only (no per-call ints), so the compiled kernel is reused across calls
    def mask_mod(b, h, q_idx, kv_idx):
        same = q_doc_T[q_idx] == k_doc_S[kv_idx]
        return same & (k_pos_S[kv_idx] <= q_pos_T[q_idx]) if causal else same

    return mask_mod


@functools.lru_cache(maxsize=32)
def _flex_block_mask(pieces: tuple[Piece, ...], q_offset: int, causal: bool, device: torch.device):
    """The document (and causal) block mask of a layout, built once and reused by every layer."""
    create_block_mask, _ = _flex()
    T, lo, hi = pieces[-1].q1, pieces[0].k0, pieces[-1].k1
    docs = torch.arange(len(pieces))
    q_doc = torch.repeat_interleave(docs, torch.tensor([p.q1 - p.q0 for p in pieces]))
    k_doc = torch.repeat_interleave(docs, torch.tensor([p.k1 - p.k0 for p in pieces]))
    mask_mod = _document_mask_mod(
        q_doc.to(device),
        torch.arange(q_offset, q_offset + T, device=device),
        k_doc.to(device),
        torch.arange(lo, hi, device=device),
        causal,
    )
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=hi - lo, device=device)


def _flex_attention(
    q: Tensor, k: Tensor, v: Tensor, pieces: list[Piece], *, q_offset: int, causal: bool, scale: float
) -> Tensor:
    """flex_attention over the key window with a document (and causal) block mask."""
    _, flex_attention = _flex()
    lo, hi = pieces[0].k0, pieces[-1].k1
    o = flex_attention(
        q.transpose(1, 2),
        k[:, lo:hi].transpose(1, 2),
        v[:, lo:hi].transpose(1, 2),
        block_mask=_flex_block_mask(tuple(pieces), q_offset, causal, q.device),
        scale=scale,
        enable_gqa=q.shape[2] != k.shape[2],
    )
    return o.transpose(1, 2)


# ----------------------------------------------------------------------------- SDPA per document


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out


def _sdpa_causal(q_BHLD: Tensor, k_BKLD: Tensor, v_BKLE: Tensor, scale: float) -> Tensor:
    """Square causal blocks; ``enable_gqa`` shares the k/v heads without copying them."""
    gqa = q_BHLD.shape[1] != k_BKLD.shape[1]
    return F.scaled_dot_product_attention(q_BHLD, k_BKLD, v_BKLE, is_causal=True, scale=scale, enable_gqa=gqa)


def _sdpa_folded(q_BLHD: Tensor, k_BSKD: Tensor, v_BSKE: Tensor, mask: Tensor | None, scale: float) -> Tensor:
    """SDPA with the G query heads of each k/v head folded into the query axis (no k/v copy);
    ``mask`` ``[L, S]`` per query token, or ``[B, 1, 1, S]`` per key. Returns ``[B, L, H, E]``."""
    B, L, H, D = q_BLHD.shape
    K, E = k_BSKD.shape[2], v_BSKE.shape[3]
    G = H // K
    q_BKMD = q_BLHD.permute(0, 2, 1, 3).reshape(B, K, G * L, D)
    if mask is not None and mask.dim() == 2 and G > 1:
        mask = mask.repeat(G, 1)
    o_BKME = F.scaled_dot_product_attention(
        q_BKMD, k_BSKD.transpose(1, 2), v_BSKE.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return o_BKME.reshape(B, H, L, E).transpose(1, 2)


def _split_fits(q: Tensor, v: Tensor) -> bool:
    """Whether the CPU flash kernel (called directly, for its log-sum-exp) takes these inputs."""
    return q.device.type == "cpu" and q.dtype in _FLASH_CPU_DTYPES and v.shape[3] == q.shape[3]


class _SplitPiece(torch.autograd.Function):
    """A causal piece whose document began before the block (CPU flash kernel, equal head dims):
    its queries see the keys before the block in full (a rectangle, no mask) and the block's own
    keys causally (a square, ``is_causal``). The two are merged by log-sum-exp; the backward runs
    the flash backward of each part with the merged output and log-sum-exp, which gives the
    gradients of the whole softmax (the ring-attention identity). Work: the rectangle plus half
    the square, with no mask, instead of the full rectangle under an explicit mask."""

    @staticmethod
    def forward(ctx, q_BHLD: Tensor, k_BKSD: Tensor, v_BKSD: Tensor, scale: float) -> Tensor:
        cut = k_BKSD.shape[2] - q_BHLD.shape[2]
        k_rect, k_sq = k_BKSD.split([cut, q_BHLD.shape[2]], dim=2)
        v_rect, v_sq = v_BKSD.split([cut, q_BHLD.shape[2]], dim=2)
        o_rect, lse_rect = _FLASH_CPU(q_BHLD, k_rect, v_rect, 0.0, False, scale=scale)
        o_sq, lse_sq = _FLASH_CPU(q_BHLD, k_sq, v_sq, 0.0, True, scale=scale)
        lse_BHL = torch.logaddexp(lse_rect, lse_sq)
        w_rect, w_sq = (torch.exp(lse - lse_BHL).unsqueeze(-1) for lse in (lse_rect, lse_sq))
        o_BHLD = (o_rect.to(w_rect.dtype) * w_rect + o_sq.to(w_sq.dtype) * w_sq).to(q_BHLD.dtype)
        ctx.save_for_backward(q_BHLD, k_BKSD, v_BKSD, o_BHLD, lse_BHL)
        ctx.scale, ctx.cut = scale, cut
        return o_BHLD

    @staticmethod
    def backward(ctx, grad_BHLD: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        k_rect, k_sq = k.split([ctx.cut, q.shape[2]], dim=2)
        v_rect, v_sq = v.split([ctx.cut, q.shape[2]], dim=2)
        grad = grad_BHLD.contiguous()
        dq_rect, dk_rect, dv_rect = _FLASH_CPU_BACKWARD(grad, q, k_rect, v_rect, o, lse, 0.0, False, scale=ctx.scale)
        dq_sq, dk_sq, dv_sq = _FLASH_CPU_BACKWARD(grad, q, k_sq, v_sq, o, lse, 0.0, True, scale=ctx.scale)
        return dq_rect + dq_sq, torch.cat([dk_rect, dk_sq], dim=2), torch.cat([dv_rect, dv_sq], dim=2), None


def _piece_call(q_p: Tensor, k_p: Tensor, v_p: Tensor, *, square: bool, causal: bool, scale: float) -> Tensor:
    """One piece (any batch) on its views: ``[B, Lq, H, E]``."""
    if not causal:
        return _sdpa_folded(q_p, k_p, v_p, None, scale)
    if square:
        return _sdpa_causal(q_p.transpose(1, 2), k_p.transpose(1, 2), v_p.transpose(1, 2), scale).transpose(1, 2)
    if _split_fits(q_p, v_p):
        q_BHLD, k_BKSD, v_BKSD = (t.transpose(1, 2) for t in (q_p, k_p, v_p))
        return _SplitPiece.apply(q_BHLD, k_BKSD, v_BKSD, scale).transpose(1, 2)
    Lq, Lk = q_p.shape[1], k_p.shape[1]
    visible_LS = torch.ones(Lq, Lk, dtype=torch.bool, device=q_p.device).tril(Lk - Lq)  # bottom-right causal
    return _sdpa_folded(q_p, k_p, v_p, visible_LS, scale)


def _run_call(q_p: Tensor, k_p: Tensor, v_p: Tensor, n: int, *, causal: bool, scale: float) -> Tensor:
    """n consecutive square pieces of one length, batched by reshaping their views (no copy)."""
    L = q_p.shape[1] // n
    q_n, k_n, v_n = (t.reshape(n, L, *t.shape[2:]) for t in (q_p, k_p, v_p))
    o_n = _piece_call(q_n, k_n, v_n, square=True, causal=causal, scale=scale)
    return o_n.reshape(1, n * L, *o_n.shape[2:])


def _buckets(pieces: list[Piece]) -> list[list[Piece]]:
    """Square pieces grouped by similar length (longest first)."""
    out: list[list[Piece]] = []
    for p in sorted(pieces, key=lambda p: p.q0 - p.q1):
        n = p.q1 - p.q0
        if out:
            top = out[-1][0].q1 - out[-1][0].q0
            if n >= BUCKET_RATIO * top or top - n <= BUCKET_SLACK:
                out[-1].append(p)
                continue
        out.append([p])
    return out


@dataclass(frozen=True)
class _Bucket:
    """n square pieces right-padded to L rows, run by one SDPA call: the rows to gather (padded
    slots repeat the piece's last row: they are dropped as queries and hidden as keys, so their
    gradient is zero), the valid slots to keep, a key-padding mask (bidirectional, padded only)."""

    n: int
    L: int
    q_rows: Tensor
    k_rows: Tensor
    valid: Tensor
    key_mask: Tensor | None
    out_rows: Tensor  # on the host: the local query row of each valid slot


@dataclass(frozen=True)
class _Part:
    """Consecutive pieces: ``count`` square pieces of one length run on views (one SDPA call), one
    piece of any shape (count 1), or pieces left to the gathered buckets (``gathered``)."""

    q_len: int
    k_len: int
    count: int
    square: bool
    gathered: bool


@dataclass(frozen=True)
class _SdpaPlan:
    parts: tuple[_Part, ...]
    buckets: tuple[_Bucket, ...]
    order: Tensor | None  # output row r is computed row order[r]; None when already in order
    inverse: Tensor | None  # computed row i goes to output row inverse[i]


def _bucket(pieces: list[Piece], *, causal: bool, device: torch.device) -> _Bucket:
    n, L = len(pieces), pieces[0].q1 - pieces[0].q0
    lens = torch.tensor([p.q1 - p.q0 for p in pieces])
    pad_L = torch.arange(L)
    valid_nL = pad_L[None, :] < lens[:, None]
    steps_nL = torch.minimum(pad_L[None, :], lens[:, None] - 1)
    q_rows = (torch.tensor([p.q0 for p in pieces])[:, None] + steps_nL).reshape(-1)
    k_rows = (torch.tensor([p.k0 for p in pieces])[:, None] + steps_nL).reshape(-1)
    padded = any(p.q1 - p.q0 != L for p in pieces)
    key_mask = valid_nL[:, None, None, :].to(device) if padded and not causal else None
    valid = valid_nL.reshape(-1).nonzero().squeeze(1)
    return _Bucket(n, L, q_rows.to(device), k_rows.to(device), valid.to(device), key_mask, out_rows=q_rows[valid])


def _runs(pieces: tuple[Piece, ...]) -> list[list[Piece]]:
    """Runs of consecutive square pieces of one length, however long (the CPU flash kernel works
    per document and query block, so a bigger batch costs no cache; measured at 8K and 32K
    tokens of 256-token documents, one call for the block took 15-17% less CPU time than calls
    of at most 4,096 tokens with the split and cat around them); other pieces alone."""
    runs: list[list[Piece]] = []
    for p in pieces:
        last = runs[-1][-1] if runs else None
        same = last is not None and last.square and p.square and last.q1 - last.q0 == p.q1 - p.q0
        runs[-1].append(p) if same else runs.append([p])
    return runs


@functools.lru_cache(maxsize=32)
def _sdpa_plan(pieces: tuple[Piece, ...], causal: bool, device: torch.device) -> _SdpaPlan:
    """How the SDPA path runs a layout, built from host ints once per micro-batch and layout (every
    layer reuses it: one host->device copy of the index tensors, none per layer).

    Runs of equal-length documents and documents of at least SOLO_MIN tokens run on views of
    q/k/v (no copy); the remaining short documents, whose per-call overhead would dominate, are
    gathered into padded buckets of similar length."""
    runs = _runs(pieces)
    short = [r[0] for r in runs if len(r) == 1 and r[0].square and r[0].q1 - r[0].q0 < SOLO_MIN]
    groups = _buckets(short)
    gathered = {p for g in groups if len(g) > 1 for p in g}
    parts: list[_Part] = []
    for run in runs:
        is_gathered = run[0] in gathered
        q_len, k_len, count = run[-1].q1 - run[0].q0, run[-1].k1 - run[0].k0, len(run)
        if is_gathered and parts and parts[-1].gathered:  # merge consecutive gathered pieces
            prev = parts.pop()
            q_len, k_len, count = prev.q_len + q_len, prev.k_len + k_len, prev.count + count
        parts.append(_Part(q_len, k_len, count, run[0].square, is_gathered))
    buckets = tuple(_bucket(g, causal=causal, device=device) for g in groups if len(g) > 1)
    if not buckets:
        return _SdpaPlan(tuple(parts), (), None, None)
    rows, start = [], 0
    for part in parts:
        if not part.gathered:
            rows.append(torch.arange(start, start + part.q_len))
        start += part.q_len
    rows += [b.out_rows for b in buckets]
    inverse = torch.cat(rows)
    return _SdpaPlan(tuple(parts), buckets, torch.argsort(inverse).to(device), inverse.to(device))


def _run_bucket(q: Tensor, k: Tensor, v: Tensor, b: _Bucket, *, causal: bool, scale: float) -> Tensor:
    """One SDPA call over a padded bucket (batch 1); returns its valid rows ``[R, H, E]``."""
    # index_select: its backward is an index_add, cheaper than advanced indexing's index_put
    q_nLHD = q[0].index_select(0, b.q_rows).view(b.n, b.L, *q.shape[2:])
    k_nLKD = k[0].index_select(0, b.k_rows).view(b.n, b.L, *k.shape[2:])
    v_nLKE = v[0].index_select(0, b.k_rows).view(b.n, b.L, *v.shape[2:])
    if causal:
        o_nHLE = _sdpa_causal(q_nLHD.transpose(1, 2), k_nLKD.transpose(1, 2), v_nLKE.transpose(1, 2), scale)
        o_nLHE = o_nHLE.transpose(1, 2)
    else:
        o_nLHE = _sdpa_folded(q_nLHD, k_nLKD, v_nLKE, b.key_mask, scale)
    return o_nLHE.reshape(b.n * b.L, *o_nLHE.shape[2:]).index_select(0, b.valid)


def _sdpa_attention(q: Tensor, k: Tensor, v: Tensor, pieces: list[Piece], *, causal: bool, scale: float) -> Tensor:
    """Per-document SDPA (see :func:`_sdpa_plan`)."""
    if len(pieces) == 1:
        p = pieces[0]
        return _piece_call(q, k[:, p.k0 : p.k1], v[:, p.k0 : p.k1], square=p.square, causal=causal, scale=scale)
    plan = _sdpa_plan(tuple(pieces), causal, q.device)
    lo, hi = pieces[0].k0, pieces[-1].k1
    k_win, v_win = k, v
    if (lo, hi) != (0, k.shape[1]):  # a slice's backward writes a full-size zero gradient: only when needed
        k_win, v_win = k[:, lo:hi], v[:, lo:hi]
    if len(plan.parts) == 1 and not plan.buckets:  # one run of equal documents: no split, no cat
        return _run_call(q, k_win, v_win, plan.parts[0].count, causal=causal, scale=scale)
    # split (not slicing): one autograd node whose backward is one cat, not a full-size zero
    # gradient per piece
    q_parts = q.split([part.q_len for part in plan.parts], dim=1)
    k_parts = k_win.split([part.k_len for part in plan.parts], dim=1)
    v_parts = v_win.split([part.k_len for part in plan.parts], dim=1)
    outputs = []
    for part, q_p, k_p, v_p in zip(plan.parts, q_parts, k_parts, v_parts, strict=True):
        if part.gathered:
            continue
        if part.count > 1:
            outputs.append(_run_call(q_p, k_p, v_p, part.count, causal=causal, scale=scale))
        else:
            outputs.append(_piece_call(q_p, k_p, v_p, square=part.square, causal=causal, scale=scale))
    if plan.order is None:
        return torch.cat(outputs, dim=1)
    rows = [o[0] for o in outputs] + [_run_bucket(q, k, v, b, causal=causal, scale=scale) for b in plan.buckets]
    return _Permute.apply(torch.cat(rows), plan.order, plan.inverse).unsqueeze(0)


class _Permute(torch.autograd.Function):
    """Rows reordered by a permutation; the backward applies the inverse permutation (an
    index_select's own backward would zero-fill and scatter-add)."""

    @staticmethod
    def forward(ctx, x: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


# ----------------------------------------------------------------------------- entry point


def doc_attention(
    q_BTHD: Tensor,
    k_BSKD: Tensor,
    v_BSKE: Tensor,
    *,
    q_offset: int,
    causal: bool,
    bounds: list[int] | None,
    scale: float,
    backend: str = "auto",
) -> Tensor:
    """Per-document attention of T queries at ``[q_offset, q_offset + T)`` over the S keys, with
    checked arguments (``bounds``: document boundaries as ints, batch 1 when given). Returns
    ``[B, T, H, E]``, contiguous."""
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    pieces = document_pieces(q_offset, T, S, causal=causal, bounds=bounds)
    chosen = select_backend(q_BTHD, v_BSKE, backend)
    if chosen == "flash":
        o = _flash_attention(q_BTHD, k_BSKD, v_BSKE, pieces, causal=causal, scale=scale)
    elif chosen == "flex":
        o = _flex_attention(q_BTHD, k_BSKD, v_BSKE, pieces, q_offset=q_offset, causal=causal, scale=scale)
    else:
        o = _sdpa_attention(q_BTHD, k_BSKD, v_BSKE, pieces, causal=causal, scale=scale)
    return o.contiguous()
