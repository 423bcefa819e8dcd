"""The gated delta rule on one device: a naive recurrence and a chunked pure-torch kernel.

Layout: q, k ``[B, T, H, K]``, v ``[B, T, H, V]``, beta ``[B, T, H]`` in [0, 1], log-decay
``g <= 0`` None, ``[H]`` or ``[B, T, H]`` (as for linear attention). The state h is ``[K, V]``
per batch and head:

    h_t = exp(g_t) (I - beta_t k_t k_t^T) h_{t-1} + beta_t k_t v_t^T,      o_t = h_t^T q_t

causal, h reset to zero at every document start (``cu_seqlens``, B == 1), ``initial_state``
feeding the first document only. Nothing is scaled or normalised (callers L2-normalise k, or
the map is not a contraction). States run in promote(dtype, fp32).

Chunked (WY / UT) form, the one fla uses. Write ``w_t = beta_t (v_t - exp(g_t) h_{t-1}^T k_t)``
so that ``h_t = exp(g_t) h_{t-1} + k_t w_t^T``. In a chunk of C tokens entered with state S,
with chunk-local cumulative log-decays b and ``D_ij = exp(b_i - b_j)`` (j <= i, same document):

    A   = tril(diag(beta) (K K^T * D), -1)          T_inv = (I + A)   (unit lower triangular)
    U   = (I + A)^{-1} diag(beta) V                 W = (I + A)^{-1} diag(beta exp(b)) K
    w   = U - W S                                   (rows of W beyond the chunk's first document are 0)
    O   = diag(exp(b)) Q S + tril(Q K^T * D) w
    S'  = P S + E,   P = exp(b_C) I - Kd^T W,   E = Kd^T U,   Kd = diag(exp(b_C - b)) K (last document)

so every chunk is an affine map of its entering state (P, E): the states are a scan over chunks,
and the same affine composition carries states across the ranks of an SP group
(parallel/lasp2_delta.py). Every exponent is <= 0 (masks are applied before ``exp``).

Autograd runs through the pure-torch kernel (triangular solves included): exact, no custom
backward. On CUDA with bf16/fp16 inputs, fla's ``chunk_gated_delta_rule`` is used when installed.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

from parallel.linear_attention import compute_dtype, decay_BTH, validate_linear_attention_inputs

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "chunk_delta_rule",
    "chunk_outputs",
    "delta_rule_attention",
    "delta_rule_recurrent",
    "fla_delta_available",
    "prepare_chunks",
    "reset_mask",
    "state_pass",
    "validate_delta_rule_inputs",
]

DEFAULT_CHUNK_SIZE = 64
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- validation


def validate_delta_rule_inputs(q, k, v, beta, *, log_decay, cu_seqlens, initial_state=None) -> None:
    """Raise ValueError naming the bad argument (q, k, v, log_decay, cu_seqlens as for linear
    attention; beta ``[B, T, H]`` floating, on q's device, values in [0, 1] (checked on CPU))."""
    validate_linear_attention_inputs(q, k, v, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state)
    if not isinstance(beta, Tensor):
        raise ValueError(f"beta must be a torch.Tensor [batch, tokens, heads], got {type(beta).__name__}")
    if tuple(beta.shape) != tuple(q.shape[:3]):
        raise ValueError(f"beta must have shape [batch, tokens, heads]={tuple(q.shape[:3])}, got {tuple(beta.shape)}")
    if not beta.is_floating_point():
        raise ValueError(f"beta must have a floating dtype, got {beta.dtype}")
    if beta.device != q.device:
        raise ValueError(f"beta must be on the same device as q ({q.device}), got {beta.device}")
    # values are checked on CPU only: on a GPU the read-back would be a host sync in the hot path
    if beta.numel() and beta.device.type == "cpu":
        with torch.no_grad():
            lo, hi = torch.aminmax(beta)
            if not (float(lo) >= 0.0 and float(hi) <= 1.0):
                raise ValueError(
                    f"beta must lie in [0, 1] (e.g. sigmoid of a projection), got values in [{float(lo)}, {float(hi)}]"
                )


def reset_mask(cu_seqlens: Tensor | None, T: int, device) -> Tensor | None:
    """True at interior document starts; None with at most one document."""
    if cu_seqlens is None or cu_seqlens.numel() <= 2:
        return None
    reset = torch.zeros(T, dtype=torch.bool, device=device)
    reset[cu_seqlens[1:-1].to(device=device, dtype=torch.long)] = True
    return reset


# ----------------------------------------------------------------------------- reference


def delta_rule_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Naive reference: a python loop over tokens. Returns ``(o, final_state [B, H, K, V])``."""
    validate_delta_rule_inputs(q, k, v, beta, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state)
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    q_, k_, v_, beta_ = q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt)
    alpha_BTH = torch.exp(decay_BTH(log_decay, B, T, H, cdt, q.device))
    starts = set() if cu_seqlens is None else set(cu_seqlens[1:-1].tolist())
    h = initial_state.to(cdt) if initial_state is not None else q_.new_zeros(B, H, K, V)
    eye = torch.eye(K, dtype=cdt, device=q.device)
    outs = []
    for t in range(T):
        if t in starts:
            h = torch.zeros_like(h)
        kt, bt = k_[:, t], beta_[:, t, :, None, None]
        transition = alpha_BTH[:, t, :, None, None] * (eye - bt * kt[..., :, None] * kt[..., None, :])
        h = transition @ h + bt * kt[..., :, None] * v_[:, t, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q_[:, t], h))
    o = torch.stack(outs, dim=1) if outs else q_.new_zeros(B, 0, H, V)
    return o.to(q.dtype), h


# ----------------------------------------------------------------------------- chunked kernel


def _chunk_masks(reset_T: Tensor | None, N: int, C: int, device):
    """(lower [N|1, C, C] incl. diagonal and same document, carry [N|1, C]: tokens the entering
    state reaches, in_last [N|1, C]: tokens of the chunk's last document, no_start [N|1])."""
    idx = torch.arange(C, device=device)
    lower_CC = idx[:, None] >= idx[None, :]
    if reset_T is None:
        ones = torch.ones(1, C, dtype=torch.bool, device=device)
        return lower_CC[None], ones, ones, ones[:, 0]
    doc_NC = reset_T.reshape(N, C).long().cumsum(-1)
    lower_NCC = lower_CC & (doc_NC[:, :, None] == doc_NC[:, None, :])
    return lower_NCC, doc_NC == 0, doc_NC == doc_NC[:, -1:], doc_NC[:, -1] == 0


def _masked_exp(mask: Tensor, log_w: Tensor) -> Tensor:
    return torch.exp(torch.where(mask, log_w, _NEG_INF))


def prepare_chunks(q, k, v, beta, a_BTH, reset_T, chunk_size: int):
    """Everything of the chunked kernel that needs no state: per chunk (P, E) and the pieces
    of the outputs. Inputs in the compute dtype; returns a dict of [B, H, N, ...] tensors."""
    B, T, H, K = q.shape
    C = max(1, min(chunk_size, T))
    N = -(-T // C)
    pad = N * C - T
    if pad:
        # k = v = 0, beta = 0 and g = 0 leave the state unchanged: the tail changes nothing
        q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        beta, a_BTH = F.pad(beta, (0, 0, 0, pad)), F.pad(a_BTH, (0, 0, 0, pad))
        reset_T = None if reset_T is None else F.pad(reset_T, (0, pad))

    def chunks(x: Tensor) -> Tensor:  # [B, N*C, H, ...] -> [B, H, N, C, ...]
        x = x.reshape(B, N, C, H, *x.shape[3:])
        return x.permute(0, 3, 1, 2, *range(4, x.dim()))

    q_c, k_c, v_c, beta_c = chunks(q), chunks(k), chunks(v), chunks(beta)
    b_c = chunks(a_BTH).cumsum(-1)  # [B, H, N, C]
    lower, carry, in_last, no_start = _chunk_masks(reset_T, N, C, q.device)
    strict = lower & ~torch.eye(C, dtype=torch.bool, device=q.device)
    log_D = b_c[..., :, None] - b_c[..., None, :]
    D_incl, D_strict = _masked_exp(lower, log_D), _masked_exp(strict, log_D)
    A = beta_c[..., :, None] * (k_c @ k_c.transpose(-1, -2)) * D_strict
    I_CC = torch.eye(C, dtype=q.dtype, device=q.device)
    carry_decay = _masked_exp(carry, b_c)  # exp(b_i) on the first document, 0 after
    rhs = torch.cat([beta_c[..., None] * v_c, (beta_c * carry_decay)[..., None] * k_c], dim=-1)
    UW = torch.linalg.solve_triangular(I_CC + A, rhs, upper=False, unitriangular=True)
    U, Wm = UW.split([v.shape[-1], K], dim=-1)
    Kd = k_c * _masked_exp(in_last, b_c[..., -1:] - b_c)[..., None]
    gamma = _masked_exp(no_start, b_c[..., -1])  # [B, H, N]
    P = gamma[..., None, None] * torch.eye(K, dtype=q.dtype, device=q.device) - Kd.transpose(-1, -2) @ Wm
    E = Kd.transpose(-1, -2) @ U
    return {"T": T, "q": q_c, "k": k_c, "carry_decay": carry_decay, "D": D_incl, "U": U, "W": Wm, "P": P, "E": E}


def state_pass(P: Tensor, E: Tensor, h0: Tensor) -> tuple[Tensor, Tensor]:
    """S(0) = h0, S(n+1) = P_n S(n) + E_n: (states entering each chunk [B,H,N,K,V], final state)."""
    state, entering = h0, []
    for P_n, E_n in zip(P.unbind(2), E.unbind(2)):  # unbind: one stack in backward, not N zero-fills
        entering.append(state)
        state = P_n @ state + E_n
    return torch.stack(entering, dim=2), state


def chunk_outputs(pieces: dict, S_in: Tensor) -> Tensor:
    """O = diag(exp(b)) Q S + tril(Q K^T * D) (U - W S) per chunk, back to [B, T, H, V]."""
    q_c, k_c = pieces["q"], pieces["k"]
    w = pieces["U"] - pieces["W"] @ S_in
    o_c = (q_c * pieces["carry_decay"][..., None]) @ S_in + ((q_c @ k_c.transpose(-1, -2)) * pieces["D"]) @ w
    B, H, N, C, V = o_c.shape
    return o_c.permute(0, 2, 3, 1, 4).reshape(B, N * C, H, V)[:, : pieces["T"]]


def chunk_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "auto",
    check: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Chunked gated delta rule, differentiable in every input (q, k, v, beta, log_decay,
    initial_state). Returns ``(o in q's dtype, final_state [B, H, K, V] in the compute dtype or None)``.

    ``backend``: ``"torch"`` (this file's kernel), ``"fla"`` (fla's Triton kernel, CUDA) or
    ``"auto"`` (fla for bf16/fp16 CUDA inputs when installed, else torch). ``check=False`` skips
    the input checks (and their host reads), for callers whose inputs are already checked."""
    if check:
        validate_delta_rule_inputs(
            q, k, v, beta, log_decay=log_decay, cu_seqlens=cu_seqlens, initial_state=initial_state
        )
    if _use_fla(backend, q):
        return _fla_delta_rule(q, k, v, beta, log_decay, cu_seqlens, initial_state, output_final_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    B, T, H, K = q.shape
    V = v.shape[-1]
    cdt = compute_dtype(q.dtype)
    if T == 0:
        h0 = q.new_zeros(B, H, K, V, dtype=cdt) if initial_state is None else initial_state.to(cdt)
        return q.new_zeros(B, 0, H, V), (h0 if output_final_state else None)
    a_BTH = decay_BTH(log_decay, B, T, H, cdt, q.device)
    pieces = prepare_chunks(
        q.to(cdt), k.to(cdt), v.to(cdt), beta.to(cdt), a_BTH, reset_mask(cu_seqlens, T, q.device), chunk_size
    )
    h0 = q.new_zeros(B, H, K, V, dtype=cdt) if initial_state is None else initial_state.to(cdt)
    S_in, final = state_pass(pieces["P"], pieces["E"], h0)
    o = chunk_outputs(pieces, S_in)
    return o.to(q.dtype), (final if output_final_state else None)


def delta_rule_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    log_decay: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
) -> Tensor:
    """Public single-device gated delta rule (DESIGN.md contract); returns o ``[B, T, H, V]``."""
    o, _ = chunk_delta_rule(q, k, v, beta, log_decay=log_decay, cu_seqlens=cu_seqlens)
    return o


# ----------------------------------------------------------------------------- fla backend


@functools.cache
def fla_delta_available() -> bool:
    """True when fla's ``chunk_gated_delta_rule`` can be imported (fla and triton present)."""
    if importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None:
        return False
    try:
        from fla.ops.gated_delta_rule import chunk_gated_delta_rule  # noqa: F401
    except Exception:  # an fla that fails to import (triton without a GPU) is not available
        return False
    return True


def _use_fla(backend: str, q: Tensor) -> bool:
    if backend == "torch":
        return False
    if backend == "auto":
        return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and fla_delta_available()
    if backend != "fla":
        raise ValueError(f"backend must be 'auto', 'torch' or 'fla', got {backend!r}")
    if not (q.is_cuda and fla_delta_available()):
        raise ValueError(
            f"backend='fla' needs CUDA tensors and flash-linear-attention installed (got device={q.device}, "
            f"fla installed={fla_delta_available()}); use backend='torch'"
        )
    return True


def _fla_delta_rule(q, k, v, beta, log_decay, cu_seqlens, initial_state, output_final_state):
    """fla's kernel with our contract: scale 1, no in-kernel L2 norm, gates expanded to
    [B, T, H] (so a per-head decay gets its gradient), one initial state per document of which
    only the first is ours, and the last document's final state."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, _ = q.shape
    g = decay_BTH(log_decay, B, T, H, torch.float32, q.device).contiguous()
    cu = None if cu_seqlens is None or cu_seqlens.numel() <= 2 else cu_seqlens.to(q.device, torch.long)
    h0 = None if initial_state is None else initial_state.float()
    if h0 is not None and cu is not None:
        h0 = torch.cat([h0, h0.new_zeros(cu.numel() - 2, *h0.shape[1:])])
    o, final = chunk_gated_delta_rule(
        q,
        k,
        v,
        g=g,
        beta=beta.to(q.dtype),
        scale=1.0,
        initial_state=h0,
        output_final_state=output_final_state,
        cu_seqlens=cu,
    )
    if final is not None:
        final = (final[-1:] if cu is not None else final).float()
    return o.to(q.dtype), final
