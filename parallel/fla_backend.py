"""flash-linear-attention (fla) chunk kernels as the CUDA backend of ``chunk_linear_attention``.

fla's ``chunk_simple_gla`` computes our causal maths (scalar per-token or per-head log-decay,
packed documents, initial and final states) in Triton. Three differences from our contract are
bridged here:
- fla scales q.k by 1/sqrt(dk) by default: we pass ``scale=1.0`` (no implicit scaling).
- a per-head decay passed as ``g_gamma`` gets no gradient from fla, so a decay that requires a
  gradient is expanded to per-token gates ``g`` (autograd sums the gradient back to ``[H]``).
- with documents fla takes one initial state per document and returns one final state per
  document; ours feeds only the first document (the state carried in from earlier ranks under
  LASP-2: every later document starts at zero) and returns the last one's.
- fla refuses the backward of per-token gates on Hopper with Triton in [3.4.0, 3.7.1) (a Triton
  miscompile, fla #640; lifted by Triton 3.7.1 with fla-core carrying fla PR #983): the
  ``auto`` backend keeps training with gates on the torch kernel there
  (:func:`fla_gated_backward_ok`).
Bidirectional attention has no fla kernel and stays on the pure-torch path.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

__all__ = [
    "fla_available",
    "fla_chunk_linear_attention",
    "fla_gated_backward_ok",
    "fla_uses_gates",
    "gated_backward_refused",
]


@functools.cache
def fla_available() -> bool:
    """True when fla's chunk kernels can be imported (fla-core and triton present)."""
    if importlib.util.find_spec("fla") is None or importlib.util.find_spec("triton") is None:
        return False
    try:
        from fla.ops.simple_gla import chunk_simple_gla  # noqa: F401
    except Exception:  # an fla that fails to import (e.g. triton without a GPU) is not available
        return False
    return True


def _version(text: str) -> tuple[int, int, int]:
    """(major, minor, patch) of a version string such as '3.7.1+git1234' (missing parts are 0)."""
    parts = []
    for piece in text.split("+")[0].split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits) if digits else 0)
    return (*parts, 0, 0, 0)[:3]


def gated_backward_refused(*, hopper: bool, triton_version: str, fla_knows_3_7_1: bool) -> bool:
    """Whether fla refuses the backward of per-token gates (``chunk_bwd_dqkwg``) on this stack.

    Triton 3.4.0 up to 3.7.0 miscompiles that kernel on Hopper (sm90: H100/H200/H20) and gives
    wrong dk/dg (fla issue #640); Triton 3.7.1 fixes it. fla-core releases that carry fla PR
    #983 (``fla.utils.TRITON_ABOVE_3_7_1``, merged 2026-06) raise only for Triton in
    [3.4.0, 3.7.1); older fla raises for every Triton >= 3.4.0 on Hopper. torch >= 2.12.1
    pins Triton 3.7.1, so a current torch + fla-core lifts the guard.
    """
    if not hopper:
        return False
    triton = _version(triton_version)
    if triton < (3, 4, 0):
        return False
    return triton < (3, 7, 1) or not fla_knows_3_7_1


@functools.cache
def fla_gated_backward_ok() -> bool:
    """False where fla refuses the backward of per-token gates (see :func:`gated_backward_refused`)."""
    if not fla_available():
        return False
    import fla.utils as fla_utils
    import triton

    refused = gated_backward_refused(
        hopper=bool(getattr(fla_utils, "IS_NVIDIA_HOPPER", False)),
        triton_version=triton.__version__,
        fla_knows_3_7_1=hasattr(fla_utils, "TRITON_ABOVE_3_7_1"),
    )
    return not refused


def fla_uses_gates(log_decay: Tensor | None) -> bool:
    """Whether fla would run with per-token gates ``g`` (a per-token decay, or a per-head decay
    that needs a gradient) rather than ``g_gamma`` or no decay."""
    return log_decay is not None and (log_decay.dim() == 3 or log_decay.requires_grad)


def fla_chunk_linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    log_decay: Tensor | None,
    cu_seqlens: Tensor | None,
    initial_state: Tensor | None,
    output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:
    """Causal linear attention by fla; inputs already validated. Returns (o, final_state in fp32)."""
    from fla.ops.simple_gla import chunk_simple_gla

    B, T, H, _ = q.shape
    g = g_gamma = None
    if log_decay is not None:
        if log_decay.dim() == 1 and not log_decay.requires_grad:
            g_gamma = log_decay.float()
        else:
            a = log_decay.float()
            g = (a.view(1, 1, H).expand(B, T, H) if a.dim() == 1 else a).contiguous()
    cu = None
    if cu_seqlens is not None and cu_seqlens.numel() > 2:
        cu = cu_seqlens.to(device=q.device, dtype=torch.long)
    h0 = None if initial_state is None else initial_state.float()
    if h0 is not None and cu is not None:
        # one initial state per document: ours feeds the first, the others start from zero
        h0 = torch.cat([h0, h0.new_zeros(cu.numel() - 2, *h0.shape[1:])])
    o, final = chunk_simple_gla(
        q,
        k,
        v,
        g=g,
        g_gamma=g_gamma,
        scale=1.0,
        initial_state=h0,
        output_final_state=output_final_state,
        cu_seqlens=cu,
    )
    if final is not None:
        final = (final[-1:] if cu is not None else final).float()
    return o.to(q.dtype), final
