"""Per-document attention (``parallel.doc_attention``) against the dense fp64 reference.

Each case takes one query block ``[q_offset, q_offset + T)`` of a packed sequence of S tokens
and all S keys, as LASP-2H's local compute does; the reference is the full-sequence masked
softmax of tests/attention_cases (no SDPA, no pieces), sliced to the block. Forward output and
the gradients of q, k and v (k and v over all S keys) are compared, in fp64.
"""

from __future__ import annotations

import pytest
import torch

import parallel.doc_attention as doc_attention_module
from parallel.doc_attention import (
    _buckets,
    doc_attention,
    document_pieces,
    piece_work,
    select_backend,
)
from parallel.softmax_sp import packed_attention
from tests.attention_cases import output_and_grads, reference_softmax_attention, rel_err, seeded

# fp64 against fp64: only the summation order differs (~1e-15)
TOL = 1e-10

# (name, S, q_offset, T, bounds): documents on the block's cuts, inside it, spanning it, many
# short ones of similar length (padded buckets), runs of equal length (batched views; the whole
# block one run: no split), all of
# these in one block, one document (bounds None)
LAYOUTS = [
    ("on_cuts", 24, 8, 8, [0, 8, 16, 24]),
    ("inside", 24, 8, 8, [0, 10, 13, 24]),
    ("spanning", 24, 8, 8, [0, 3, 21, 24]),
    ("starts_before", 24, 8, 8, [0, 5, 12, 24]),
    ("many_similar", 64, 0, 64, [0, 9, 17, 26, 33, 41, 44, 46, 50, 64]),
    ("many_offset", 60, 20, 30, [0, 7, 19, 22, 29, 31, 40, 45, 51, 60]),
    ("equal_runs", 40, 0, 40, [0, 4, 8, 12, 20, 28, 30, 40]),
    ("one_run", 32, 0, 32, [0, 8, 16, 24, 32]),
    ("one_run_offset", 32, 16, 16, [0, 8, 16, 24, 32]),
    ("runs_gathered_and_partial", 48, 6, 36, [0, 10, 14, 18, 22, 25, 27, 35, 43, 48]),
    ("one_doc", 24, 8, 8, None),
    ("first_block", 24, 0, 8, [0, 2, 3, 11, 24]),
    ("last_block", 24, 16, 8, [0, 2, 17, 18, 24]),
]
HEADS = [(2, 2), (4, 2), (6, 1)]  # (q heads, k/v heads): MHA and GQA


def _inputs(S: int, H: int, K: int, D: int = 8, E: int = 6, batch: int = 1):
    key = (S, H, K, D, E, batch)
    q = seeded("q", key, (batch, S, H, D))
    k = seeded("k", key, (batch, S, K, D))
    v = seeded("v", key, (batch, S, K, E))
    g = seeded("g", key, (batch, S, H, E))
    return q, k, v, g


def _check(name, S, q_offset, T, bounds, causal, H, K, batch=1, method="auto", E=6):
    q, k, v, g = _inputs(S, H, K, E=E, batch=batch)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref_out = reference_softmax_attention(*leaves, causal=causal, bounds=bounds, scale=0.3)
    block = slice(q_offset, q_offset + T)
    ref = output_and_grads(ref_out[:, block], tuple(leaves), g[:, block])

    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    q_block = leaves[0][:, block]
    if method == "auto":
        out = doc_attention(q_block, leaves[1], leaves[2], q_offset=q_offset, causal=causal, bounds=bounds, scale=0.3)
    else:
        out = packed_attention(
            q_block, leaves[1], leaves[2], q_offset=q_offset, causal=causal, bounds=bounds, scale=0.3, method=method
        )
    got = output_and_grads(out, tuple(leaves), g[:, block])
    for what, x, y in zip(("o", "dq", "dk", "dv"), got, ref, strict=True):
        assert rel_err(x, y) <= TOL, f"{name} causal={causal} H={H}/{K} {what}: {rel_err(x, y):.2e}"


@pytest.mark.parametrize("H,K", HEADS, ids=[f"{h}q{k}kv" for h, k in HEADS])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("name,S,q_offset,T,bounds", LAYOUTS, ids=[row[0] for row in LAYOUTS])
def test_matches_dense_reference(name, S, q_offset, T, bounds, causal, H, K):
    _check(name, S, q_offset, T, bounds, causal, H, K)


PARTIAL = [row for row in LAYOUTS if document_pieces(row[2], row[3], row[1], causal=True, bounds=row[4])[0].k0 < row[2]]


@pytest.mark.parametrize("H,K", HEADS, ids=[f"{h}q{k}kv" for h, k in HEADS])
@pytest.mark.parametrize("name,S,q_offset,T,bounds", PARTIAL, ids=[row[0] for row in PARTIAL])
def test_partial_piece_split_and_merged_by_log_sum_exp(name, S, q_offset, T, bounds, H, K, monkeypatch):
    # equal q/v head dims: the piece whose document began before the block runs as a rectangle
    # plus a causal square merged by log-sum-exp (_SplitPiece), not under an explicit mask
    calls = []
    apply = doc_attention_module._SplitPiece.apply

    def counted(*args):
        calls.append(args[0].shape)
        return apply(*args)

    monkeypatch.setattr(doc_attention_module._SplitPiece, "apply", counted)
    batch = 2 if bounds is None else 1  # one document: any batch
    _check(name, S, q_offset, T, bounds, True, H, K, batch=batch, E=8)
    assert len(calls) == 1 and calls[0][0] == batch


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_batch_without_documents(causal):
    _check("batch", 16, 4, 8, None, causal, 4, 2, batch=3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_dense_method_is_the_same_maths(causal):
    _check("dense", 60, 20, 30, [0, 7, 19, 22, 29, 31, 40, 45, 51, 60], causal, 4, 2, method="dense")


def test_pieces_tile_the_block_and_the_key_window():
    bounds = [0, 5, 12, 13, 30, 40]
    for causal in (True, False):
        pieces = document_pieces(10, 15, 40, causal=causal, bounds=bounds)
        assert [(p.q0, p.q1) for p in pieces] == [(0, 2), (2, 3), (3, 15)]
        assert all(a.k1 == b.k0 for a, b in zip(pieces, pieces[1:]))
        assert pieces[0].k0 == 5 and pieces[-1].k1 == (25 if causal else 30)
        # work: rows x keys per document, far below the block times the window
        expected = 2 * 7 + 1 * 1 + 12 * (12 if causal else 17)
        assert piece_work(pieces) == expected < 15 * (pieces[-1].k1 - 5)


def test_buckets_group_similar_lengths_only():
    pieces = document_pieces(0, 400, 400, causal=True, bounds=[0, 200, 370, 380, 390, 400])
    lengths = [[p.q1 - p.q0 for p in b] for b in _buckets(pieces)]
    assert lengths == [[200, 170], [10, 10, 10]]


def test_bad_backend_names_the_choices():
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(ValueError, match="allowed auto, flash, flex, sdpa"):
        select_backend(q, q, "cudnn")
    with pytest.raises(ValueError, match="backend='flash' needs CUDA"):
        select_backend(q, q, "flash")
    assert select_backend(q, q) == "sdpa"


def test_plan_uses_views_for_runs_and_gathers_only_short_singles():
    from parallel.doc_attention import _sdpa_plan

    pieces = document_pieces(6, 36, 48, causal=True, bounds=[0, 10, 14, 18, 22, 25, 27, 35, 43, 48])
    plan = _sdpa_plan(tuple(pieces), True, torch.device("cpu"))
    kinds = [(part.q_len, part.count, part.square, part.gathered) for part in plan.parts]
    # the partial first document alone, the run of three 4-token documents on one view, the
    # short singles [22, 42) gathered
    assert kinds == [(4, 1, False, False), (12, 3, True, False), (20, 4, True, True)]
    assert [b.n for b in plan.buckets] == [4] and plan.order is not None
