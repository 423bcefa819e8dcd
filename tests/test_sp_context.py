"""SPContext (parallel/sp_context.py): built from host ints without reading the device, the same
spans as the validating ``rank_spans``, RoPE positions restarting per document, clear errors,
and one agreement all-gather that makes every rank raise on mismatched bounds."""

from __future__ import annotations

import pytest
import torch

from parallel import comm
from parallel.sp_context import SPContext, rank_spans
from tests.distributed import run_on_ranks
from tests.sp_sim import documents
from tests.test_host_syncs import count_host_reads


@pytest.mark.parametrize("docs", ["none", "inside", "on_cut", "span3", "mixed"])
@pytest.mark.parametrize("W,T", [(1, 5), (3, 4), (4, 1)])
def test_context_spans_equal_rank_spans(W, T, docs):
    bounds = documents(docs, W, T)
    cu = None if bounds is None else torch.tensor(bounds)
    for r in range(W):
        with count_host_reads() as reads:
            sp = SPContext.build(comm.SOLO, local_len=T, bounds=bounds, rank=r, num_ranks=W)
        assert sum(reads.values()) == 0, reads
        want = rank_spans(cu, num_ranks=W, rank=r, local_len=T)
        got = sp.spans
        assert (got.continues, got.single) == (want.continues, want.single)
        if want.local_cu_seqlens is None:
            assert got.local_cu_seqlens is None
        else:
            assert torch.equal(got.local_cu_seqlens, want.local_cu_seqlens)
        assert sp.offset == r * T and sp.num_documents == (1 if bounds is None else len(bounds) - 1)


def test_positions_restart_in_every_document():
    # rank 1 of 2 with 5 tokens each holds global tokens 5..9: doc [3,7) then doc [7,10)
    sp = SPContext.build(comm.SOLO, local_len=5, bounds=[0, 3, 7, 10], rank=1, num_ranks=2)
    assert sp.positions_T.tolist() == [2, 3, 0, 1, 2]
    assert sp.cu_seqlens.tolist() == [0, 3, 7, 10]
    assert SPContext.single(3).positions_T.tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"bounds": [0, 3, 7]}, "end at the packed sequence's length 8"),
        ({"bounds": [1, 8]}, "start at 0"),
        ({"bounds": [0, 4, 4, 8]}, "strictly increasing"),
        ({"local_len": 0}, "local_len must be a positive int"),
        ({"rank": 2}, "rank 2 is not in"),
        ({"valid_T": torch.ones(3, dtype=torch.bool)}, "valid_T must have shape"),
    ],
)
def test_bad_input_names_the_problem(kwargs, fragment):
    args = {"local_len": 4, "rank": 0, "num_ranks": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        SPContext.build(comm.SOLO, **args)


def _agree(ctx, differ: bool):
    T = 4
    bounds = [0, 3 + (ctx.rank if differ else 0), 2 * T]
    sp = SPContext.build(ctx.world, local_len=T, bounds=bounds)
    with comm.CommMeter() as meter:
        try:
            sp.check_agreement()
        except ValueError as exc:
            return str(exc), meter.summary()
    return None, meter.summary()


def test_one_agreement_gather_and_every_rank_raises_on_mismatch():
    for message, summary in run_on_ranks(2, _agree, False):
        assert message is None
        # 5 int64 per rank (a validity flag, group size, local tokens, bounds length, crc32), one peer
        assert summary == {"all_gather": {"calls": 1, "bytes_sent": 40, "bytes_received": 40}}
    messages = [m for m, _ in run_on_ranks(2, _agree, True)]
    assert all(m is not None and "disagree on cu_seqlens checksum" in m for m in messages), messages
