"""Cross-check against fla's naive gated-delta-rule references, restated here (not imported).

Source: fla-org/flash-linear-attention, file fla/ops/gated_delta_rule/naive.py at commit
39f2d4029eb29a16d963b39dda20a2a0cfdad0f7 (repository HEAD bc3b101d, 2026-08-22), functions
``naive_recurrent_gated_delta_rule`` and ``naive_chunk_gated_delta_rule``. Their maths:

* recurrent, per token i (state h [K, V] per head, fp32): h <- h * exp(g_i);
  u = beta_i (v_i - h^T k_i); h <- h + k_i u^T; o_i = h^T (scale * q_i), scale = K^-1/2 by default.
* chunked (chunk C, per chunk n, cumulative in-chunk log-decay d, L_ij = exp(d_i - d_j) for j <= i):
  N = -tril(diag(beta) K K^T * L, -1), the rows of N accumulated by forward substitution
  (row i += row i[:i] @ N[:i, :i]) and I added: T = (I - N_strict)^{-1};
  U = T diag(beta) V, Wd = T diag(beta exp(d)) K; per chunk with state S:
  v_new = U - Wd S, o = diag(exp(d)) (scale Q) S + tril(scale Q K^T * L) v_new,
  S <- exp(d_C) S + (K * exp(d_C - d))^T v_new.

No documents in fla's naive code: packed documents are checked one document at a time.
Tolerance: fp64, <= 1e-10 relative.
"""

from __future__ import annotations

import math

import pytest
import torch

from parallel.delta_rule import chunk_delta_rule
from tests.delta_cases import make_delta_inputs
from tests.sp_sim import rel_err

FP64_TOL = 1e-10


def fla_recurrent(q, k, v, beta, g, scale, h0):
    """Restatement of fla's naive_recurrent_gated_delta_rule (tensors [B, T, H, ...])."""
    B, T, H, K = q.shape
    h = h0.clone()
    outs = []
    for i in range(T):
        h = h * g[:, i].exp()[..., None, None]
        u = beta[:, i, :, None] * (v[:, i] - torch.einsum("bhkv,bhk->bhv", h, k[:, i]))
        h = h + k[:, i, :, :, None] * u[:, :, None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", scale * q[:, i], h))
    return torch.stack(outs, 1), h


def fla_chunk(q, k, v, beta, g, scale, h0, C):
    """Restatement of fla's naive_chunk_gated_delta_rule (forward substitution for the inverse)."""
    B, T, H, K = q.shape
    pad = (-T) % C

    def to_chunks(x):  # [B, T, H, ...] -> [B, H, N, C, ...]
        x = torch.nn.functional.pad(x.movedim(1, -1), (0, pad)).movedim(-1, 2)
        return x.reshape(B, H, -1, C, *x.shape[3:])

    q, k, v, beta, g = (to_chunks(x) for x in (q * scale, k, v, beta, g))
    d = g.cumsum(-1)
    L = (d[..., :, None] - d[..., None, :]).tril().exp().tril()
    N = -((beta[..., None] * k) @ k.transpose(-1, -2) * L).tril(-1)
    for i in range(1, C):
        N[..., i, :i] = N[..., i, :i] + (N[..., i, :i, None] * N[..., :i, :i]).sum(-2)
    Tm = N + torch.eye(C, dtype=q.dtype)
    U, Wd = Tm @ (beta[..., None] * v), Tm @ (beta[..., None] * d.exp()[..., None] * k)
    S, outs = h0.clone(), []
    for n in range(q.shape[2]):
        v_new = U[:, :, n] - Wd[:, :, n] @ S
        qn, kn, dn = q[:, :, n], k[:, :, n], d[:, :, n]
        outs.append((qn * dn.exp()[..., None]) @ S + ((qn @ kn.transpose(-1, -2)) * L[:, :, n]).tril() @ v_new)
        S = S * dn[..., -1, None, None].exp() + (kn * (dn[..., -1:] - dn).exp()[..., None]).transpose(-1, -2) @ v_new
    o = torch.stack(outs, 2).reshape(B, H, -1, v.shape[-1])[:, :, :T].transpose(1, 2)
    return o, S


@pytest.mark.parametrize("T,C", [(9, 4), (16, 8), (5, 16)], ids=str)
def test_chunked_kernel_equals_fla_naive_references(T, C):
    q, k, v, beta, g, _, _ = make_delta_inputs(1, T, "token", "none", seed=5)
    B, _, H, K = q.shape
    h0 = torch.randn(B, H, K, v.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    scale = 1 / math.sqrt(K)
    # our op scales nothing: the caller passes scale * q (runtime/deltanet.py does so)
    o, final = chunk_delta_rule(
        scale * q, k, v, beta, log_decay=g, initial_state=h0, output_final_state=True, chunk_size=C
    )
    for reference in (fla_recurrent(q, k, v, beta, g, scale, h0), fla_chunk(q, k, v, beta, g, scale, h0, C)):
        assert rel_err(o, reference[0]) <= FP64_TOL
        assert rel_err(final, reference[1]) <= FP64_TOL


def test_packed_documents_equal_fla_reference_per_document():
    q, k, v, beta, g, cu, _ = make_delta_inputs(3, 5, "token", "mixed", seed=7)
    o = chunk_delta_rule(q, k, v, beta, log_decay=g, cu_seqlens=cu, chunk_size=4)[0]
    zero = torch.zeros(1, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    bounds = cu.tolist()
    want = torch.cat(
        [fla_recurrent(*(x[:, a:b] for x in (q, k, v, beta, g)), 1.0, zero)[0] for a, b in zip(bounds, bounds[1:])],
        dim=1,
    )
    assert rel_err(o, want) <= FP64_TOL
