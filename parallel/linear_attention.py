"""Single-device linear attention: the reference and the pure-torch chunked kernel.

Everything in the parallel layer (LASP-2, the LASP-1 ring) is built from the pieces in this
file, so this docstring is the single statement of the maths.

Layout: q, k are ``[B, T, H, dk]``, v is ``[B, T, H, dv]``. No implicit scaling, no
normaliser. States and scans run in ``promote(input dtype, float32)`` (never below fp32);
outputs come back in the input dtype, states in the compute dtype.

Log-decay ``a <= 0``: ``None`` (a = 0), ``[H]`` (fixed per head) or ``[B, T, H]`` (a scalar
gate per token and head).

* Causal: ``S_s = exp(a_s) * S_{s-1} + k_s^T v_s`` (S is dk x dv per batch and head) and
  ``o_s = q_s S_s`` (inclusive of s), with ``S_{-1} = h0`` (``initial_state``, ``[B,H,dk,dv]``).
* Bidirectional: with ``b = cumsum(a)``,
  ``o_i = sum_{j<=i} exp(b_i - b_j) (q_i.k_j) v_j + sum_{j>i} exp(b_j - b_i) (q_i.k_j) v_j``,
  i.e. the weight between i and j is the product of ``exp(a_m)`` over ``m`` in
  ``(min(i,j), max(i,j)]`` (symmetric decay). No initial or final state.
* Packed documents, ``cu_seqlens = [0, t1, ..., T]`` (B == 1): nothing crosses a boundary; the
  state is zero at every document start. ``initial_state`` feeds only the first document and
  the final state is the state at the end of the last one.

Sequence-parallel composition (per rank, LASP-2 section 1c): the causal final state of a span
with initial state h0 is ``exp(log_gamma) * h0 + E`` (``last_segment_state``) and the output
is ``o(h0) = o(0) + exp(first_segment_decay) * (q . h0)``.

Numerics: only chunk-local (or suffix-local) cumulative log-decays are used and every
exponent is <= 0: masks are applied before ``exp`` (``where(mask, diff, -inf)``), so neither
the forward nor the backward pass produces inf/NaN, even for decays of -50 per token.

Chunked kernel (chunk C): the intra-chunk part is a masked ``C x C`` product, the inter-chunk
part a scan over per-chunk states, ``O(T*C*d + T*d^2)``. The anticausal half of the
bidirectional form is a strictly-causal pass over the reversed sequence whose decays and
document starts are shifted by one token (the weight of j > i uses a_{i+1..j}, not a_{i..j-1}).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.fla_backend import fla_available, fla_chunk_linear_attention, fla_gated_backward_ok, fla_uses_gates

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "chunk_linear_attention",
    "compute_dtype",
    "decay_BTH",
    "first_segment_decay",
    "last_segment_decay",
    "last_segment_state",
    "linear_attention",
    "linear_attention_recurrent",
    "segment_ids",
    "validate_linear_attention_inputs",
]

DEFAULT_CHUNK_SIZE = 64

_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- validation


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # "Never below fp32": bf16/fp16/fp32 compute in fp32, fp64 stays fp64.
    return torch.promote_types(dtype, torch.float32)


def _check_tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _validate_qkv(q: Tensor, k: Tensor, v: Tensor, *, q_name: str = "q") -> None:
    # q_name: last_segment_state validates (k, k, v) and its messages must name k, not q.
    for name, t in ((q_name, q), ("k", k), ("v", v)):
        _check_tensor(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be rank-4 [batch, tokens, heads, head_dim], got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {t.dtype}")
    ref = q_name
    for name, t in (("k", k), ("v", v)):
        if t is q:
            continue
        if t.shape[:3] != q.shape[:3]:
            raise ValueError(
                f"{name} must have the same [batch, tokens, heads] as {ref}: {ref} has {tuple(q.shape[:3])}, "
                f"{name} has {tuple(t.shape[:3])}"
            )
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the same dtype as {ref}: {ref} is {q.dtype}, {name} is {t.dtype}")
        if t.device != q.device:
            raise ValueError(
                f"{name} must be on the same device as {ref}: {ref} is on {q.device}, {name} on {t.device}"
            )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"k must have the same head dim as {ref}: {ref} has {q.shape[3]}, k has {k.shape[3]}")


def _validate_log_decay(log_decay: object, B: int, T: int, H: int, device: torch.device) -> None:
    a = _check_tensor("log_decay", log_decay)
    if a.shape not in ((H,), (B, T, H)):
        raise ValueError(
            f"log_decay must have shape [heads]=({H},) or [batch, tokens, heads]=({B}, {T}, {H}), got {tuple(a.shape)}"
        )
    if not a.is_floating_point():
        raise ValueError(f"log_decay must have a floating dtype, got {a.dtype}")
    if a.device != device:
        raise ValueError(f"log_decay must be on the same device as q ({device}), got {a.device}")
    if a.numel() == 0:
        return
    with torch.no_grad():
        if not bool(torch.isfinite(a).all()):
            raise ValueError("log_decay must be finite (a log of a decay factor in (0, 1]), got inf/NaN values")
        top = float(a.max())
    if top > 0:
        raise ValueError(f"log_decay must be <= 0 everywhere (log of a decay factor in (0, 1]), got max {top}")


def _validate_cu_seqlens(cu_seqlens: object, B: int, T: int) -> None:
    cu = _check_tensor("cu_seqlens", cu_seqlens)
    if cu.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_docs + 1], got shape {tuple(cu.shape)}")
    if cu.is_floating_point() or cu.is_complex() or cu.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (int32 or int64), got {cu.dtype}")
    if B != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (documents are packed along tokens), got batch {B}")
    vals = cu.tolist()
    if len(vals) < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries [0, ..., T], got {vals}")
    if vals[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {vals[0]}")
    if vals[-1] != T:
        raise ValueError(f"cu_seqlens must end at the number of tokens T={T}, got {vals[-1]}")
    if any(b <= a for a, b in zip(vals[:-1], vals[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {vals}")


def _validate_extras(
    q: Tensor, v: Tensor, *, log_decay: object, cu_seqlens: object, initial_state: object = None
) -> None:
    B, T, H, dk = q.shape
    if log_decay is not None:
        _validate_log_decay(log_decay, B, T, H, q.device)
    if cu_seqlens is not None:
        _validate_cu_seqlens(cu_seqlens, B, T)
    if initial_state is not None:
        h0 = _check_tensor("initial_state", initial_state)
        want = (B, H, dk, v.shape[3])
        if tuple(h0.shape) != want:
            raise ValueError(f"initial_state must have shape [batch, heads, dk, dv]={want}, got {tuple(h0.shape)}")
        if not h0.is_floating_point():
            raise ValueError(f"initial_state must have a floating dtype, got {h0.dtype}")
        if h0.device != q.device:
            raise ValueError(f"initial_state must be on the same device as q ({q.device}), got {h0.device}")


def validate_linear_attention_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None = None,
) -> None:
    """Raise ValueError naming the bad argument, what it got and what is allowed."""
    _validate_qkv(q, k, v)
    _validate_extras(q, v, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state)


def _check_bidirectional_args(causal: bool, initial_state: Tensor | None, output_final_state: bool) -> None:
    if causal:
        return
    if initial_state is not None:
        raise ValueError("initial_state is not defined for causal=False (bidirectional); pass None")
    if output_final_state:
        raise ValueError("output_final_state=True is not defined for causal=False (bidirectional)")


# ----------------------------------------------------------------------------- helpers


def segment_ids(cu_seqlens: Tensor | None, T: int) -> Tensor:
    """Document index (0-based) of each of the T tokens; all zeros without cu_seqlens."""
    device = cu_seqlens.device if cu_seqlens is not None else None
    starts_T = torch.zeros(T, dtype=torch.long, device=device)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        starts_T[cu_seqlens[1:-1].long()] = 1
    return starts_T.cumsum(0)


def decay_BTH(
    log_decay: Tensor | None, B: int, T: int, H: int, dtype: torch.dtype, device: torch.device | None
) -> Tensor:
    # A per-head decay is expanded (a view), so autograd sums its gradient back to [H].
    if log_decay is None:
        return torch.zeros(B, T, H, dtype=dtype, device=device)
    a = log_decay.to(dtype)
    return a.view(1, 1, H).expand(B, T, H) if a.dim() == 1 else a


def _reset_T(cu_seqlens: Tensor | None, T: int, device: torch.device) -> Tensor | None:
    """True at interior document starts (the state is zeroed before that token is added).

    Position 0 is not a reset: the initial state is, by definition, the state before document 0.
    None when there is at most one document (nothing to reset).
    """
    if cu_seqlens is None or cu_seqlens.numel() <= 2:
        return None
    reset = torch.zeros(T, dtype=torch.bool, device=device)
    reset[cu_seqlens[1:-1].to(device=device, dtype=torch.long)] = True
    return reset


def _shift_right(x: Tensor, dim: int, fill: float | bool) -> Tensor:
    """x shifted one step along dim: out[0] = fill, out[t] = x[t-1]."""
    head = torch.full_like(x.narrow(dim, 0, 1), fill)
    return torch.cat([head, x.narrow(dim, 0, x.shape[dim] - 1)], dim=dim)


# ----------------------------------------------------------------------------- chunked kernel


def _masked_exp(mask: Tensor, log_w: Tensor) -> Tensor:
    # Masking before exp: the masked entries may be large positive numbers (b_i - b_j, i < j),
    # and exp of those would overflow and then poison the backward pass with inf * 0 = NaN.
    return torch.exp(torch.where(mask, log_w, _NEG_INF))


def _chunk_masks(
    reset_T: Tensor | None, N: int, C: int, *, strict: bool, device: torch.device
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Masks of the chunked kernel; all but the first are None with a single document.

    Returns (intra [N|1, C, C]: causal and same document; carry [N, C]: tokens the incoming state
    reaches; in_last [N, C]: tokens of the chunk's last document; no_start [N]: chunks the state
    chain passes through).
    """
    idx = torch.arange(C, device=device)
    causal_CC = idx[:, None] > idx[None, :] if strict else idx[:, None] >= idx[None, :]
    if reset_T is None:
        return causal_CC, None, None, None
    # Chunk-local document index: 0 for the document the chunk starts in (which may have begun
    # earlier and is the only one the incoming state reaches), +1 at each start inside. A start
    # inside the chunk, or at its first token, cuts the state chain.
    doc_NC = reset_T.reshape(N, C).long().cumsum(-1)
    intra_NCC = causal_CC & (doc_NC[:, :, None] == doc_NC[:, None, :])
    return intra_NCC, doc_NC == 0, doc_NC == doc_NC[:, -1:], doc_NC[:, -1] == 0


def _scan_states(gamma_BHN: Tensor, E_BHNKV: Tensor, h0_BHKV: Tensor) -> tuple[Tensor, Tensor]:
    """S_in(0) = h0, S_in(n+1) = gamma_n * S_in(n) + E_n: (states entering each chunk, final state)."""
    # unbind, not indexing: the backward of E[:, :, n] would allocate a full-size zero gradient per
    # chunk (quadratic in N); unbind's backward is a single stack.
    state_BHKV = h0_BHKV
    entering = []
    for gamma_BH, E_BHKV in zip(gamma_BHN.unbind(2), E_BHNKV.unbind(2)):
        entering.append(state_BHKV)
        state_BHKV = gamma_BH[:, :, None, None] * state_BHKV + E_BHKV
    if not entering:
        return E_BHNKV, state_BHKV  # no chunks (T = 0): E_BHNKV is the empty [B, H, 0, dk, dv]
    return torch.stack(entering, dim=2), state_BHKV


def _chunk_causal(
    q_BTHK: Tensor,
    k_BTHK: Tensor,
    v_BTHV: Tensor,
    a_BTH: Tensor,
    reset_T: Tensor | None,
    h0_BHKV: Tensor | None,
    *,
    strict: bool,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Causal (strict: j < i instead of j <= i) linear attention over chunks; compute dtype in/out.

    Returns o [B,T,H,dv] and the state after the last token [B,H,dk,dv].
    """
    B, T, H, K = q_BTHK.shape
    V = v_BTHV.shape[-1]
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # Zero k/v add nothing to the state and a = 0 keeps it unchanged, so the padded tail
        # changes neither the outputs, the final state nor any gradient.
        q_BTHK, k_BTHK, v_BTHV = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q_BTHK, k_BTHK, v_BTHV))
        a_BTH = F.pad(a_BTH, (0, 0, 0, pad))
        reset_T = None if reset_T is None else F.pad(reset_T, (0, pad))

    def chunks(x: Tensor) -> Tensor:  # [B, N*C, H, D] -> [B, H, N, C, D]
        return x.reshape(B, N, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    q, k, v = chunks(q_BTHK), chunks(k_BTHK), chunks(v_BTHV)
    b_BHNC = a_BTH.reshape(B, N, C, H).permute(0, 3, 1, 2).cumsum(-1)  # chunk-local cumsum
    b_last_BHN1 = b_BHNC[..., -1:]

    intra_mask, carry_NC, in_last_NC, no_start_N = _chunk_masks(reset_T, N, C, strict=strict, device=q.device)
    log_gamma_BHN = b_last_BHN1[..., 0]
    if no_start_N is not None:
        log_gamma_BHN = torch.where(no_start_N, log_gamma_BHN, _NEG_INF)

    # Intra-chunk: (q k^T * D) v with D_ij = exp(b_i - b_j) on the (document-)causal mask.
    decay_BHNCC = _masked_exp(intra_mask, b_BHNC[..., :, None] - b_BHNC[..., None, :])
    o_BHNCV = ((q @ k.transpose(-1, -2)) * decay_BHNCC) @ v

    # Per-chunk contributions: the weight of the incoming state at i is exp(b_i); the chunk's own
    # state at its end is E = sum_i (k_i exp(b_last - b_i))^T v_i over its last document.
    if carry_NC is None:
        w_in_BHNC = torch.exp(b_BHNC)
        w_out_BHNC = torch.exp(b_last_BHN1 - b_BHNC)
    else:
        w_in_BHNC = _masked_exp(carry_NC, b_BHNC)
        w_out_BHNC = _masked_exp(in_last_NC, b_last_BHN1 - b_BHNC)
    E_BHNKV = (k * w_out_BHNC[..., None]).transpose(-1, -2) @ v
    gamma_BHN = torch.exp(log_gamma_BHN)

    state_BHKV = h0_BHKV if h0_BHKV is not None else q.new_zeros(B, H, K, V)
    entering_BHNKV, state_BHKV = _scan_states(gamma_BHN, E_BHNKV, state_BHKV)
    o_BHNCV = o_BHNCV + (q * w_in_BHNC[..., None]) @ entering_BHNKV

    o_BTHV = o_BHNCV.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, :T]
    return o_BTHV, state_BHKV


def _chunk_bidirectional(
    q: Tensor, k: Tensor, v: Tensor, a_BTH: Tensor | None, reset_T: Tensor | None, chunk_size: int
) -> Tensor:
    if a_BTH is None and reset_T is None:
        # No decay, one document: o = q (sum_j k_j^T v_j), O(T d^2).
        return torch.einsum("bthk,bhkv->bthv", q, torch.einsum("bthk,bthv->bhkv", k, v))
    B, T, H, _ = q.shape
    if a_BTH is None:
        a_BTH = q.new_zeros(B, T, H)
    o_causal, _ = _chunk_causal(q, k, v, a_BTH, reset_T, None, strict=False, chunk_size=chunk_size)
    if T <= 1:
        return o_causal
    # Anticausal half on the reversed sequence (i' = T-1-i): the weight of j > i is
    # prod_{m=i+1..j} exp(a_m) = prod_{m'=j'..i'-1} exp(a'_m'), a strictly-causal recurrence whose
    # decay at token p is a'_{p-1}. The document starts move by one token in the same way.
    a_rev = _shift_right(a_BTH.flip(1), dim=1, fill=0.0)
    reset_rev = None if reset_T is None else _shift_right(reset_T.flip(0), dim=0, fill=False)
    o_anti_rev, _ = _chunk_causal(
        q.flip(1), k.flip(1), v.flip(1), a_rev, reset_rev, None, strict=True, chunk_size=chunk_size
    )
    return o_causal + o_anti_rev.flip(1)


def chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Chunked linear attention, differentiable in q, k, v, log_decay and initial_state.

    Returns ``(o, final_state)``: o in q's dtype; final_state ``[B, H, dk, dv]`` in the compute
    dtype (fp32 or fp64) when ``output_final_state`` (causal only), else None.

    ``backend``: ``"torch"`` (this file's pure-torch kernel, the reference and the CPU path),
    ``"fla"`` (flash-linear-attention's Triton kernel; CUDA, causal only) or ``"auto"``: fla for
    causal bf16/fp16 inputs on CUDA when fla is installed, else torch. fp32 inputs stay on torch
    under auto because fla's kernels may use TF32 products.

    ``check=False`` skips the input checks, which read values back from the device (the
    decay's range, cu_seqlens); for callers that checked them already, such as the SP ops'
    context path.
    """
    if check:
        validate_linear_attention_inputs(
            q, k, v, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state
        )
    _check_bidirectional_args(causal, initial_state, output_final_state)
    if _use_fla(backend, causal, q, k, v, log_decay):
        return fla_chunk_linear_attention(
            q,
            k,
            v,
            log_decay=log_decay,
            cu_seqlens=cu_seqlens,
            initial_state=initial_state,
            output_final_state=output_final_state,
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    cdt = compute_dtype(q.dtype)
    B, T, H, _ = q.shape
    qc, kc, vc = q.to(cdt), k.to(cdt), v.to(cdt)
    reset_T = _reset_T(cu_seqlens, T, q.device)
    if not causal:
        a_BTH = None if log_decay is None else decay_BTH(log_decay, B, T, H, cdt, q.device)
        return _chunk_bidirectional(qc, kc, vc, a_BTH, reset_T, chunk_size).to(q.dtype), None
    a_BTH = decay_BTH(log_decay, B, T, H, cdt, q.device)
    h0 = None if initial_state is None else initial_state.to(cdt)
    o, state = _chunk_causal(qc, kc, vc, a_BTH, reset_T, h0, strict=False, chunk_size=chunk_size)
    return o.to(q.dtype), (state if output_final_state else None)


def _use_fla(backend: str, causal: bool, q: Tensor, k: Tensor, v: Tensor, log_decay: Tensor | None) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        if not (q.is_cuda and causal and q.dtype in (torch.bfloat16, torch.float16) and fla_available()):
            return False
        # where fla refuses the gated backward, training with gates stays on the torch kernel
        needs_grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, log_decay))
        return fla_gated_backward_ok() or not (needs_grad and fla_uses_gates(log_decay))
    if backend != "fla":
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
    if not (q.is_cuda and causal and fla_available()):
        raise ValueError(
            "backend='fla' needs CUDA tensors, causal attention and flash-linear-attention installed "
            f"(got device={q.device}, causal={causal}, fla installed={fla_available()}); use backend='torch'"
        )
    return True


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Public single-device linear attention (DESIGN.md contract); returns o ``[B, T, H, dv]``."""
    o, _ = chunk_linear_attention(q, k, v, causal=causal, log_decay=log_decay, cu_seqlens=cu_seqlens)
    return o


# ----------------------------------------------------------------------------- rank-level pieces


def last_segment_state(
    k: Tensor, v: Tensor, *, log_decay: Tensor | None = None, cu_seqlens: Tensor | None = None, check: bool = True
) -> tuple[Tensor, Tensor]:
    """``(E [B,H,dk,dv], log_gamma [B,H])`` of this span, in the compute dtype.

    E is the final state of the span's last document started from zero,
    ``E = sum_{i in last doc} (k_i exp(beta - b_i))^T v_i``; log_gamma is the total log-decay of
    the span, or -inf when a document starts strictly inside (0, T). The causal final state with
    initial state h0 is ``exp(log_gamma)[..., None, None] * h0 + E``.

    A document starting exactly at token 0 cannot be expressed by cu_seqlens: the caller, who
    knows the global boundaries, must then drop the incoming state itself.

    ``check=False`` skips the input checks, which read values back from the device (the SP
    ops' context path has checked them once per micro-batch).
    """
    if check:
        _validate_qkv(k, k, v, q_name="k")
        _validate_extras(k, v, log_decay=log_decay, cu_seqlens=cu_seqlens)
    B, T, H, _ = k.shape
    cdt = compute_dtype(k.dtype)
    a_BTH = decay_BTH(log_decay, B, T, H, cdt, k.device)
    log_w_BTH, log_gamma_BH = _suffix_decays(a_BTH)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        log_w_BTH = _only_last_document(log_w_BTH, cu_seqlens)
        log_gamma_BH = torch.full_like(log_gamma_BH, _NEG_INF)
    w_BTH = torch.exp(log_w_BTH)
    E_BHKV = torch.einsum("bthk,bthv->bhkv", k.to(cdt) * w_BTH[..., None], v.to(cdt))
    return E_BHKV, log_gamma_BH


def _suffix_decays(a_BTH: Tensor) -> tuple[Tensor, Tensor]:
    """(sum_{m > i} a_m per token, the span's total sum a_m per row). Accumulated from the end,
    so the exponents stay precise near it; beta - b_i of the docstrings is the first one."""
    B, T, H = a_BTH.shape
    suffix_BTH = a_BTH.flip(1).cumsum(1).flip(1)
    exclusive_BTH = torch.cat([suffix_BTH[:, 1:], a_BTH.new_zeros(B, min(T, 1), H)], dim=1)
    return exclusive_BTH, (suffix_BTH[:, 0] if T else a_BTH.new_zeros(B, H))


def _only_last_document(x_BTH: Tensor, cu_seqlens: Tensor) -> Tensor:
    # compared on the device: int(cu_seqlens[-2]) would be a device->host read
    in_last_T = torch.arange(x_BTH.shape[1], device=x_BTH.device) >= cu_seqlens[-2]
    return torch.where(in_last_T[None, :, None], x_BTH, _NEG_INF)


def last_segment_decay(
    log_decay: Tensor | None,
    cu_seqlens: Tensor | None,
    B: int,
    T: int,
    H: int,
    *,
    dtype: torch.dtype,
    device: torch.device | None,
) -> Tensor:
    """``[B, T, H]``: log-decay from token i (exclusive) to the span's end for last-document
    tokens, -inf before: a state entering from the right reaches o_i with weight exp of it
    (the mirror of ``first_segment_decay``; used by bidirectional sequence parallelism)."""
    log_w_BTH, _ = _suffix_decays(decay_BTH(log_decay, B, T, H, dtype, device))
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        log_w_BTH = _only_last_document(log_w_BTH, cu_seqlens)
    return log_w_BTH


def first_segment_decay(
    log_decay: Tensor | None,
    cu_seqlens: Tensor | None,
    B: int,
    T: int,
    H: int,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> Tensor:
    """``[B, T, H]``: cumulative log-decay from token 0 (inclusive) for first-document tokens, -inf after.

    The initial state's contribution to o_i is ``exp(b_i) * (q_i . h0)``. dtype defaults to
    promote(log_decay dtype, fp32) (fp32 without a decay); device to log_decay's or cu_seqlens'.
    """
    if dtype is None:
        dtype = compute_dtype(log_decay.dtype) if log_decay is not None else torch.float32
    if device is None:
        src = log_decay if log_decay is not None else cu_seqlens
        device = src.device if src is not None else None
    b_BTH = decay_BTH(log_decay, B, T, H, dtype, device).cumsum(1)
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        in_first_T = torch.arange(T, device=b_BTH.device) < cu_seqlens[1]
        b_BTH = torch.where(in_first_T[None, :, None], b_BTH, _NEG_INF)
    return b_BTH


# ----------------------------------------------------------------------------- references


def _quadratic_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Explicit O(T^2) form with the full decay matrix (reference; no initial state)."""
    B, T, H, _ = q.shape
    cdt = compute_dtype(q.dtype)
    b_BTH = decay_BTH(log_decay, B, T, H, cdt, q.device).cumsum(1)
    diff_BIJH = b_BTH[:, :, None, :] - b_BTH[:, None, :, :]  # b_i - b_j: <= 0 for i >= j
    idx = torch.arange(T, device=q.device)
    lower_IJ = idx[:, None] >= idx[None, :]
    seg_T = segment_ids(cu_seqlens, T).to(q.device)
    mask_IJ = seg_T[:, None] == seg_T[None, :]
    if causal:
        mask_IJ = mask_IJ & lower_IJ
    # Symmetric decay: exp(b_i - b_j) below the diagonal, exp(b_j - b_i) above (both <= 0).
    log_w_BIJH = torch.where(lower_IJ[None, :, :, None], diff_BIJH, -diff_BIJH)
    w_BIJH = _masked_exp(mask_IJ[None, :, :, None], log_w_BIJH)
    scores_BIJH = torch.einsum("bihk,bjhk->bijh", q.to(cdt), k.to(cdt))
    return torch.einsum("bijh,bjhv->bihv", scores_BIJH * w_BIJH, v.to(cdt)).to(q.dtype)


def linear_attention_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = True,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Naive reference: a python loop over tokens (causal) or the quadratic form (bidirectional).

    Slow; for tests and tiny inputs. Returns ``(o, final_state)`` for causal, ``(o, None)`` otherwise.
    """
    validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state)
    _check_bidirectional_args(causal, initial_state, False)
    if not causal:
        return _quadratic_attention(q, k, v, causal=False, log_decay=log_decay, cu_seqlens=cu_seqlens), None
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    q_, k_, v_ = q.to(cdt), k.to(cdt), v.to(cdt)
    alpha_BTH = torch.exp(decay_BTH(log_decay, B, T, H, cdt, q.device))
    starts = set() if cu_seqlens is None else set(cu_seqlens[1:-1].tolist())
    state = initial_state.to(cdt) if initial_state is not None else q_.new_zeros(B, H, K, V)
    outs = []
    for t in range(T):
        if t in starts:
            state = torch.zeros_like(state)
        state = alpha_BTH[:, t, :, None, None] * state + k_[:, t, :, :, None] * v_[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_[:, t], state))
    o = torch.stack(outs, dim=1) if outs else q_.new_zeros(B, 0, H, V)
    return o.to(q.dtype), state
