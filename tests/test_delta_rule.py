"""The single-device gated delta rule: chunked kernel vs the naive recurrence.

Tolerance: fp64, <= 1e-10 relative, for the output, the final state and every gradient
(q, k, v, beta, log_decay, initial_state).
"""

from __future__ import annotations

import pytest
import torch

from parallel.delta_rule import chunk_delta_rule, delta_rule_attention, delta_rule_recurrent
from tests.delta_cases import DK, DV, H, delta_reference, make_delta_inputs
from tests.sp_sim import rel_err

FP64_TOL = 1e-10


@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("docs", ["none", "inside", "on_cut", "span3", "mixed"])
@pytest.mark.parametrize("T,chunk", [(1, 4), (7, 4), (13, 5), (16, 4), (9, 64)], ids=str)
def test_chunked_matches_recurrence_fp64(T, chunk, docs, decay):
    # 3*T tokens with the document layouts of 3 ranks of T, so boundaries fall anywhere in chunks
    q, k, v, beta, a, cu, do = make_delta_inputs(3, T, decay, docs)
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, beta, a)]
    o, _ = chunk_delta_rule(*leaves[:4], log_decay=leaves[4], cu_seqlens=cu, chunk_size=chunk)
    wanted = [x for x in leaves if x is not None]
    got = (o.detach(), *torch.autograd.grad(o, wanted, do))
    want = [x for x in delta_reference(q, k, v, beta, a, cu, do) if x is not None]
    assert len(got) == len(want)
    for name, x, y in zip(["o", "dq", "dk", "dv", "dbeta", "dlog_decay"], got, want):
        assert rel_err(x, y) <= FP64_TOL, f"{name}: {rel_err(x, y):.2e}"


@pytest.mark.parametrize("docs", ["none", "mixed"])
def test_initial_and_final_state_fp64(docs):
    q, k, v, beta, a, cu, do = make_delta_inputs(3, 5, "token", docs, seed=3)
    B = q.shape[0]
    h0 = torch.randn(B, H, DK, DV, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    dfinal = torch.randn_like(h0)

    def run(fn, **kw):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, beta, a, h0)]
        o, final = fn(*leaves[:4], log_decay=leaves[4], cu_seqlens=cu, initial_state=leaves[5], **kw)
        grads = torch.autograd.grad([o, final], leaves, [do, dfinal])
        return (o.detach(), final.detach(), *grads)

    got = run(chunk_delta_rule, output_final_state=True, chunk_size=4)
    want = run(delta_rule_recurrent)
    for name, x, y in zip(["o", "final", "dq", "dk", "dv", "dbeta", "da", "dh0"], got, want):
        assert rel_err(x, y) <= FP64_TOL, f"{name}: {rel_err(x, y):.2e}"


def test_beta_zero_is_identity_and_decay_only_decays():
    """With beta = 0 the state never changes: o = 0 from a zero start (an independent fact)."""
    q, k, v, beta, a, cu, _ = make_delta_inputs(2, 4, "token", "none")
    o = delta_rule_attention(q, k, v, torch.zeros_like(beta), log_decay=a)
    assert o.abs().max().item() == 0.0


def test_one_token_matches_hand_formula():
    """o_0 = beta_0 (q_0 . k_0) v_0: the first token's state is beta k v^T."""
    q, k, v, beta, _, _, _ = make_delta_inputs(1, 1, "none", "none")
    o = delta_rule_attention(q, k, v, beta)
    want = beta[..., None] * (q * k).sum(-1, keepdim=True) * v
    assert rel_err(o, want) <= FP64_TOL


@pytest.mark.parametrize(
    "change,fragment",
    [
        (lambda b: b[:, :-1], "beta must have shape"),
        (lambda b: b + 1.5, "beta must lie in"),
        (lambda b: b.long(), "floating dtype"),
    ],
)
def test_bad_beta_is_one_clear_error(change, fragment):
    q, k, v, beta, _, _, _ = make_delta_inputs(1, 4, "none", "none")
    with pytest.raises(ValueError, match=fragment):
        delta_rule_attention(q, k, v, change(beta))


def test_positive_decay_is_rejected():
    q, k, v, beta, _, _, _ = make_delta_inputs(1, 4, "none", "none")
    with pytest.raises(ValueError, match="log_decay"):
        delta_rule_attention(q, k, v, beta, log_decay=torch.full((H,), 0.1, dtype=torch.float64))
