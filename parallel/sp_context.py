"""SPContext: everything the SP attention ops need from the host, built once per micro-batch.

A packed micro-batch's layout (which SP group, where the documents begin, where this rank's
shard starts) is host data: the runtime knows it as Python ints before any token reaches the
device. Every attention layer needs the same derived facts (the device ``cu_seqlens``, LASP-2's
rank spans, RoPE positions inside documents, the padding mask), so they are derived once, here,
and handed to every layer. Inside a layer's forward and backward nothing is then read back from
the device (DESIGN invariant 8): a device->host read stalls the CUDA stream, once per layer.

The cross-rank agreement check (every rank of the group holds the same document bounds and
local length) is one all-gather of 5 int64 per rank for the whole model per micro-batch
(``SPContext.check_agreement``), instead of one per layer.

Layout: group rank r of W holds tokens ``[r*T, (r+1)*T)`` of the packed sequence (the
"contiguous" layout). ``bounds`` are the document boundaries ``[0, ..., W*T]`` of the whole
packed sequence, or None for one document (then the batch may hold several sequences).

The ops' public functions (``lasp2_attention``, ``allgather_attention``, ...) stay as thin
validating wrappers for direct callers: they read ``cu_seqlens`` back, run one agreement
all-gather of their shard's fingerprint (:func:`check_shards_agree`), build a context and call
the op's ``*_in_context`` entry. This module also holds those shared validation pieces.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from parallel import comm
from parallel.comm import Group

__all__ = [
    "RankSpans",
    "SPContext",
    "check_group_agreement",
    "check_shards_agree",
    "rank_spans",
    "shard_fingerprint",
    "spans_from_bounds",
    "validate_packed_cu_seqlens",
]


# --------------------------------------------------------------------------------------------
# Where documents and rank cuts fall (LASP-2 and the LASP-1 ring).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankSpans:
    """What every rank of an SP group knows about rank cuts and documents."""

    num_ranks: int
    rank: int
    local_len: int
    continues: tuple[bool, ...]
    """continues[u]: rank u's first token continues a document that began on an earlier rank."""
    single: tuple[bool, ...]
    """single[u]: no document starts strictly inside rank u (its span is one document piece)."""
    local_cu_seqlens: Tensor | None
    """This rank's document boundaries [0, ..., T] on the device, or None when it holds one
    document piece."""


def spans_from_bounds(
    bounds: Sequence[int] | None, *, num_ranks: int, rank: int, local_len: int, device=None
) -> RankSpans:
    """This rank's spans from checked host bounds of the whole packed sequence (None: one
    document). Reads nothing from the device; copies the local boundaries to ``device``."""
    total = num_ranks * local_len
    bounds = [0, total] if bounds is None else list(bounds)
    starts = set(bounds[:-1])
    continues = tuple(u > 0 and u * local_len not in starts for u in range(num_ranks))
    single = tuple(not any(u * local_len < b < (u + 1) * local_len for b in bounds[1:-1]) for u in range(num_ranks))
    start, end = rank * local_len, (rank + 1) * local_len
    inner = [b - start for b in bounds if start < b < end]
    local_cu = None if not inner else to_device(torch.tensor([0, *inner, local_len], dtype=torch.int64), device)
    return RankSpans(num_ranks, rank, local_len, continues, single, local_cu)


def rank_spans(cu_seqlens: Tensor | None, *, num_ranks: int, rank: int, local_len: int, device=None) -> RankSpans:
    """Check the global ``cu_seqlens`` (a host read) and derive this rank's view of the packed
    sequence; for direct callers and tests (the runtime builds an :class:`SPContext`)."""
    total = num_ranks * local_len
    bounds = None
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
            raise ValueError(
                f"cu_seqlens must be a 1-D integer tensor, got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}"
            )
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total:
            raise ValueError(
                f"cu_seqlens must start at 0 and end at the packed length W*T = {num_ranks}*{local_len} = {total} "
                f"(it describes the whole sequence, identical on every rank); got {bounds[:4]}...{bounds[-2:]}"
            )
        if any(b <= a for a, b in zip(bounds, bounds[1:])):
            raise ValueError("cu_seqlens must be strictly increasing (no empty documents)")
    return spans_from_bounds(bounds, num_ranks=num_ranks, rank=rank, local_len=local_len, device=device)


def to_device(x: Tensor, device) -> Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory, so the copy does not make
    the host wait for the stream (a pageable copy synchronises)."""
    device = torch.device("cpu") if device is None else torch.device(device)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


# --------------------------------------------------------------------------------------------
# Validation and the cross-rank agreement check (shared by every op's public wrapper).
# --------------------------------------------------------------------------------------------


def check_bounds(bounds: Sequence[int], *, total_tokens: int) -> list[int]:
    """Host document boundaries ``[0, ..., total_tokens]``, strictly increasing, as a list of ints."""
    bounds = [int(b) for b in bounds]
    if len(bounds) < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries [0, ..., {total_tokens}], got {bounds}")
    if bounds[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {bounds[0]}")
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty documents), got {bounds}")
    if bounds[-1] != total_tokens:
        raise ValueError(
            f"cu_seqlens must end at the packed sequence's length {total_tokens} (group size x local tokens), "
            f"got {bounds[-1]}"
        )
    return bounds


def validate_packed_cu_seqlens(cu_seqlens: object, *, batch: int, total_tokens: int) -> list[int] | None:
    """Check the packed sequence's document boundaries ``[0, ..., total_tokens]`` (a host read);
    return them as ints."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, Tensor):
        raise ValueError(f"cu_seqlens must be a torch.Tensor or None, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1:
        raise ValueError(f"cu_seqlens must be 1-D [num_docs + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise ValueError(f"cu_seqlens must have an integer dtype (int32 or int64), got {cu_seqlens.dtype}")
    if batch != 1:
        raise ValueError(f"cu_seqlens requires batch size 1 (documents are packed along tokens), got batch {batch}")
    return check_bounds(cu_seqlens.tolist(), total_tokens=total_tokens)


def bounds_checksum(bounds: Sequence[int] | None) -> tuple[int, int]:
    """(length, crc32) of the boundaries: stable across processes (unlike hash()), O(1) to send."""
    if bounds is None:
        return 0, 0
    return len(bounds), zlib.crc32(struct.pack(f"<{len(bounds)}q", *bounds))


def _fingerprint_names(extra_name: str) -> tuple[str, ...]:
    return (
        "batch",
        "local tokens",
        "q heads",
        "k/v heads",
        "qk head dim",
        "v head dim",
        "dtype",
        "causal",
        extra_name,
        "cu_seqlens length",
        "cu_seqlens checksum",
    )


def shard_fingerprint(
    q: Tensor | None,
    k: Tensor | None,
    v: Tensor | None,
    *,
    causal: bool,
    bounds: list[int] | None,
    extra: tuple[str, int | float],
) -> dict[str, int]:
    """What every rank of a group must agree on, as ints; all zeros when q is None (invalid shard).

    ``extra`` is one op-specific (name, value) pair such as the scale (a float is sent as its bits).
    """
    names = _fingerprint_names(extra[0])
    if q is None or k is None or v is None:
        return dict.fromkeys(names, 0)
    extra_value = _float_bits(extra[1]) if isinstance(extra[1], float) else int(extra[1])
    values = (*q.shape[:3], k.shape[2], q.shape[3], v.shape[3], zlib.crc32(str(q.dtype).encode()), int(causal))
    return dict(zip(names, (*values, extra_value, *bounds_checksum(bounds))))


def check_group_agreement(
    op: str, fields: dict[str, int], problem: str | None, *, group: Group, device: torch.device
) -> None:
    """Raise one ValueError on every rank of ``group`` if any rank's inputs are invalid or differ.

    Every rank gathers (validity flag, fields) as int64 before raising, also a rank whose own
    inputs are invalid: the ranks leave together, so none is left waiting in a later collective.
    ``fields`` must have the same length on every rank. Reading the result is one host read.
    """
    if comm.group_size(group) == 1:
        if problem is not None:
            raise ValueError(problem)
        return
    local = torch.tensor([int(problem is not None), *fields.values()], dtype=torch.int64, device=device)
    rows_W, _ = comm.dist_all_gather(local, group=group)
    rows = rows_W.tolist()
    if problem is not None:
        raise ValueError(problem)
    invalid = [rank for rank, row in enumerate(rows) if row[0]]
    if invalid:
        raise ValueError(f"{op}: invalid inputs on group rank(s) {invalid} (their error names the argument)")
    for column, name in enumerate(fields, start=1):
        values = [row[column] for row in rows]
        if len(set(values)) > 1:
            raise ValueError(
                f"{op}: the ranks of the group disagree on {name}, which must be identical on every rank; "
                f"values by group rank: {values}"
            )


def check_shards_agree(
    op: str,
    q: object,
    k: object,
    v: object,
    *,
    causal: bool,
    bounds: list[int] | None,
    extra: tuple[str, int | float],
    problem: str | None,
    group: Group,
) -> None:
    """:func:`check_group_agreement` on the :func:`shard_fingerprint` of this rank's shard
    (one all-gather of 12 int64 per rank)."""
    valid = problem is None
    fields = shard_fingerprint(q if valid else None, k, v, causal=causal, bounds=bounds, extra=extra)
    device = q.device if isinstance(q, Tensor) else torch.device("cpu")
    check_group_agreement(op, fields, problem, group=group, device=device)


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


# --------------------------------------------------------------------------------------------
# The context.
# --------------------------------------------------------------------------------------------


def positions_in_documents(bounds: Sequence[int] | None, offset: int, local_len: int) -> Tensor:
    """[T] int64 on the host: each local token's position inside its own document (RoPE
    restarts per document); tokens ``[offset, offset + T)`` of the packed sequence."""
    global_T = torch.arange(offset, offset + local_len, dtype=torch.int64)
    if bounds is None:
        return global_T
    starts_D = torch.tensor(list(bounds[:-1]), dtype=torch.int64)
    doc_T = torch.bucketize(global_T, starts_D, right=True) - 1
    return global_T - starts_D[doc_T]


@dataclass(frozen=True)
class SPContext:
    """One micro-batch's layout on this rank: the SP group, the document bounds (host ints and
    device ``cu_seqlens``), LASP-2's rank spans, RoPE positions and the padding mask.

    Build it with :meth:`build` (or :meth:`single`) from host data; that reads nothing back
    from the device. The ops' ``*_in_context`` entries take it and validate nothing.
    """

    group: Group
    spans: RankSpans
    bounds: tuple[int, ...] | None
    """Document boundaries of the group's whole packed sequence [0, ..., W*T] (None: one document)."""
    cu_seqlens: Tensor | None
    """``bounds`` on the device (int64)."""
    positions_T: Tensor
    """[T] int64 on the device: each local token's position inside its document (RoPE)."""
    valid_T: Tensor | None
    """[T] bool on the device, False on padding tokens; None when the shard has no padding."""

    @classmethod
    def build(
        cls,
        group: Group,
        *,
        local_len: int,
        bounds: Sequence[int] | None = None,
        device: torch.device | str | None = None,
        rank: int | None = None,
        num_ranks: int | None = None,
        valid_T: Tensor | None = None,
        agree: bool = False,
    ) -> SPContext:
        """The context of this rank's shard of ``local_len`` tokens. ``rank`` / ``num_ranks``
        default to this process's index in ``group`` and its size (host calls, no device
        read); ``bounds`` are checked here. ``agree=True`` runs :meth:`check_agreement`."""
        num_ranks = comm.group_size(group) if num_ranks is None else num_ranks
        rank = comm.group_rank(group) if rank is None else rank
        if isinstance(local_len, bool) or not isinstance(local_len, int) or local_len < 1:
            raise ValueError(f"SPContext: local_len must be a positive int (tokens on this rank), got {local_len!r}")
        if not 0 <= rank < num_ranks:
            raise ValueError(f"SPContext: rank {rank} is not in [0, {num_ranks}) (the group's size)")
        checked = None if bounds is None else tuple(check_bounds(bounds, total_tokens=num_ranks * local_len))
        device = torch.device("cpu") if device is None else torch.device(device)
        if valid_T is not None and tuple(valid_T.shape) != (local_len,):
            raise ValueError(f"SPContext: valid_T must have shape [{local_len}], got {tuple(valid_T.shape)}")
        context = cls(
            group=group,
            spans=spans_from_bounds(checked, num_ranks=num_ranks, rank=rank, local_len=local_len, device=device),
            bounds=checked,
            cu_seqlens=None if checked is None else to_device(torch.tensor(checked, dtype=torch.int64), device),
            positions_T=to_device(positions_in_documents(checked, rank * local_len, local_len), device),
            valid_T=None if valid_T is None else to_device(valid_T, device),
        )
        if agree:
            context.check_agreement()
        return context

    @classmethod
    def single(
        cls,
        local_len: int,
        bounds: Sequence[int] | None = None,
        *,
        device: torch.device | str | None = None,
        valid_T: Tensor | None = None,
    ) -> SPContext:
        """The context of a single-device (SP=1) batch of ``local_len`` tokens."""
        return cls.build(comm.SOLO, local_len=local_len, bounds=bounds, device=device, valid_T=valid_T)

    @classmethod
    def from_cu_seqlens(
        cls, group: Group, cu_seqlens: Tensor | None, *, local_len: int, device=None, valid_T: Tensor | None = None
    ) -> SPContext:
        """For direct callers holding a ``cu_seqlens`` tensor: reads it back (a host read)."""
        bounds = None if cu_seqlens is None else [int(b) for b in cu_seqlens.tolist()]
        return cls.build(group, local_len=local_len, bounds=bounds, device=device, valid_T=valid_T)

    @property
    def rank(self) -> int:
        """This rank's index in the group."""
        return self.spans.rank

    @property
    def num_ranks(self) -> int:
        return self.spans.num_ranks

    @property
    def local_len(self) -> int:
        return self.spans.local_len

    @property
    def offset(self) -> int:
        """Position of this shard's first token in the packed sequence (group rank * T)."""
        return self.spans.rank * self.spans.local_len

    @property
    def device(self) -> torch.device:
        return self.positions_T.device

    @property
    def bounds_list(self) -> list[int] | None:
        return None if self.bounds is None else list(self.bounds)

    @property
    def num_documents(self) -> int:
        return 1 if self.bounds is None else len(self.bounds) - 1

    def agreement_fields(self) -> dict[str, int]:
        """What every rank of the group must agree on, as ints."""
        length, checksum = bounds_checksum(self.bounds)
        return {
            "group size": self.num_ranks,
            "local tokens": self.local_len,
            "cu_seqlens length": length,
            "cu_seqlens checksum": checksum,
        }

    def check_agreement(self, op: str = "SP context") -> None:
        """One all-gather of 5 int64 per rank over the group (no collective for one rank):
        raises the same ValueError on every rank when the ranks were given different document
        bounds or local lengths. Run it once per micro-batch, not per layer."""
        check_group_agreement(op, self.agreement_fields(), None, group=self.group, device=self.device)
