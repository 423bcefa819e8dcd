"""Time and memory of running packed sequences on one SP group: the planner's cost model.

A group of ``d`` ranks (``d`` a power of two) runs one micro-batch made of the sequences of
lengths ``s_1 … s_n`` packed into one sequence of ``S = Σ s`` tokens, ``S / d`` per rank.

Time of the group (ms), an α-β model in the sequence lengths (FlexSP §4.1.2):

    T(d) = beta_ms + c(d) + Σ_k t(s_k, d)        (0 for an empty group)
    t(s, d) = (q(d)·quad_ms·s² + r(d)·lin_ms·s) / d          compute: softmax attention, the rest
            + comm_bytes_per_token·s·f(d) / bw(d)            SP traffic proportional to tokens
            + moe_bytes_per_token·s / d / ep_bandwidth       MoE expert all-to-all (fixed EP group)
    c(d) = comm_bytes_per_group·(d − 1) / bw(d)              LASP-2 state all-gathers (size fixed)

with q(1) = 1 and q(d) = quad_sp_factor for d > 1: the slowest rank's share of a document's
softmax work when it is spread over the group. Per-document attention (LASP-2H's local
compute, parallel/doc_attention.py) costs, per softmax layer and rank,
Σ over the rank's pieces of c_sq·L² for a document that starts in the rank's block and
c_br·Lq·Lk for the piece of one that began on an earlier rank (computed in full under a mask),
so a document of s tokens costs c_sq·s² at d = 1 but ≈ c_br·s²/d on the last rank of a
degree-d group: q = c_br/c_sq (≈ 1.6–1.8 measured on CPU). It is 1 for Ulysses and
flash-attention-style kernels that split the work evenly (the published presets); sequences
much shorter than a rank's block are overestimated by it at d > 1.

r(1) = 1 and r(d) = lin_sp_factor for d > 1: a rank's per-token work at degree d over lin_ms/d,
what spreading a sequence costs per token beyond the bytes priced below (the ranks' waits at
every layer's collectives, work on the gathered keys and states). 1 in the published presets;
``seqmoe profile`` fits it with q (runtime/profile.py): r from the degrees, q from packed groups.

A step of M micro-batches takes step_ms + Σ_m max_groups T (:meth:`CostModel.step_time_ms`):
step_ms is what every step pays whatever the plan (the optimizer step, the ZeRO / data-parallel
gradient reduction, the balance all-reduces), so it changes no plan and ``StepPlan``'s
predicted_time_s (the micro-batches' time) leaves it out.

with f(d) = 1/d for Ulysses all-to-all (the FlexSP artefact's "4·2·L·h·s·2/d", no (d−1)/d)
and f(d) = (d−1)/d for LASP-2H's K/V all-gather; a group of one rank sends nothing (c = f = 0,
only the MoE term stays). Bandwidths follow the artefact's units: ``bytes / 2**20 / bw`` is
milliseconds (MiB over "GB/s"), so the ``flexsp-gpt7b-a100`` preset reproduces its numbers.

Memory per rank (GB = 1024 MB, MB = 2**20 bytes, the artefact's convention):

    M(d) = model_state_gb + (act_mb_per_token·S/d + kv_gather_mb_per_token·S·(d−1)/d) / 1024

where the last term is the transient K/V gathered from the other d−1 ranks by LASP-2H (0 for
Ulysses). A group fits when M(d) ≤ memory_budget_gb and d ≤ max_degree (Ulysses is bounded by
the number of KV heads), which gives the group's token capacity

    token_capacity(d) = ⌊1024·(memory_budget_gb − model_state_gb) / (act/d + kv·(d−1)/d)⌋.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["CostModel", "is_power_of_two", "zero_model_state_gb"]

_MIB = 2.0**20
_SEQ_COMM_KINDS = ("alltoall", "allgather")
_GROUP_SIZES = ("pow2", "any")


def is_power_of_two(n: object) -> bool:
    """An int (not a bool) >= 1 that is a power of two: the sizes of the planner's buddy groups."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


def zero_model_state_gb(num_params: float, *, zero_stage: int, world_size: int, mixed_precision: bool = True) -> float:
    """Model states per rank (GB) under ZeRO stage 0–3 sharded over ``world_size`` ranks.

    Mixed-precision Adam keeps 16 bytes per parameter: fp16/bf16 weights (2) and gradients (2)
    and fp32 master weights, momentum and variance (12); plain fp32 Adam keeps 16 as well
    (4 weights + 4 gradients + 8 moments). ZeRO-1 shards the optimizer part, ZeRO-2 the
    gradients too, ZeRO-3 everything (the sharded fractions are those of the FlexSP artefact).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage: got {zero_stage!r}; allowed: 0, 1, 2, 3")
    if world_size < 1:
        raise ValueError(f"world_size: got {world_size!r}; must be >= 1")
    if num_params < 0:
        raise ValueError(f"num_params: got {num_params!r}; must be >= 0")
    n = world_size
    if mixed_precision:
        sharded = {0: 0.0, 1: 12 / 16, 2: 14 / 16, 3: 1.0}[zero_stage]
    else:
        sharded = {0: 0.0, 1: 8 / 16, 2: 12 / 16, 3: 1.0}[zero_stage]
    return num_params * 16 * (sharded / n + (1 - sharded)) / 2**30


@dataclass(kw_only=True)
class CostModel:
    """Coefficients of one model on one cluster; see the module docstring for the maths."""

    quad_ms: float
    """ms per token² for one sequence on one rank (softmax attention, fwd + bwd of the whole model)."""
    lin_ms: float
    """ms per token on one rank (linear attention, MLP / experts, everything else)."""
    beta_ms: float
    """Fixed ms per group per micro-batch (launch latency, per-micro-batch gathers)."""
    act_mb_per_token: float
    """Activation memory per token (MB) kept for the backward pass."""
    memory_budget_gb: float
    """Usable memory per rank (GB)."""
    model_state_gb: float = 0.0
    """Model states per rank (GB); see :func:`zero_model_state_gb`."""
    quad_sp_factor: float = 1.0
    """q(d > 1): slowest rank's softmax work at SP degree d over quad_ms·s²/d (per-document
    attention: c_br/c_sq; 1 for Ulysses / evenly split kernels)."""
    lin_sp_factor: float = 1.0
    """r(d > 1): a rank's per-token work at SP degree d over lin_ms/d (see the module docstring)."""
    step_ms: float = 0.0
    """Fixed ms per training step (optimizer step, gradient reduction, balance all-reduces)."""
    seq_comm: str = "alltoall"
    """SP traffic proportional to tokens: 'alltoall' (Ulysses, f=1/d) or 'allgather' (LASP-2H, f=(d-1)/d)."""
    comm_bytes_per_token: float = 0.0
    """Bytes per token of the group's packed sequence for that traffic (fwd + bwd, all layers)."""
    comm_bytes_per_group: float = 0.0
    """Bytes per rank of each peer's constant-size state (LASP-2 all-gathers, fwd + bwd, all layers)."""
    moe_bytes_per_token: float = 0.0
    """Bytes per rank-local token sent by the MoE expert all-to-all (fwd + bwd, all MoE layers)."""
    ep_bandwidth_gbps: float = 0.0
    """Bandwidth of the expert-parallel all-to-all (needed when moe_bytes_per_token > 0)."""
    bandwidth_gbps: dict[int, float] = field(default_factory=dict)
    """SP-group bandwidth per power-of-two degree >= 2; degrees above the largest key reuse its value."""
    kv_gather_mb_per_token: float = 0.0
    """Transient gathered K/V per token of the group (LASP-2H softmax layer), scaled by (d-1)/d."""
    max_degree: int | None = None
    """Largest allowed SP degree (e.g. Ulysses: the number of KV heads); None = no limit."""
    group_sizes: str = "pow2"
    """SP degrees the planner may use: 'pow2' (buddy groups) or 'any' (contiguous blocks of any
    size; with all-to-all traffic and a max_degree, only its divisors, since Ulysses splits heads)."""
    name: str = "custom"
    notes: str = ""
    """Provenance of the coefficients."""

    def __post_init__(self) -> None:
        self.bandwidth_gbps = _parse_bandwidth(self.bandwidth_gbps)
        self._validate()

    def _validate(self) -> None:
        for name in ("quad_ms", "lin_ms", "beta_ms", "model_state_gb", "comm_bytes_per_token"):
            _check_number(name, getattr(self, name), positive=False)
        for name in ("comm_bytes_per_group", "moe_bytes_per_token", "ep_bandwidth_gbps", "kv_gather_mb_per_token"):
            _check_number(name, getattr(self, name), positive=False)
        _check_number("step_ms", self.step_ms, positive=False)
        _check_number("quad_sp_factor", self.quad_sp_factor, positive=True)
        _check_number("lin_sp_factor", self.lin_sp_factor, positive=True)
        _check_number("act_mb_per_token", self.act_mb_per_token, positive=True)
        _check_number("memory_budget_gb", self.memory_budget_gb, positive=True)
        if self.memory_budget_gb <= self.model_state_gb:
            raise ValueError(
                f"memory_budget_gb: got {self.memory_budget_gb}; must exceed model_state_gb={self.model_state_gb} "
                "(no memory would be left for activations)"
            )
        if self.seq_comm not in _SEQ_COMM_KINDS:
            raise ValueError(f"seq_comm: got {self.seq_comm!r}; allowed: 'alltoall', 'allgather'")
        if (self.comm_bytes_per_token or self.comm_bytes_per_group) and not self.bandwidth_gbps:
            raise ValueError("bandwidth_gbps: empty, but the model has SP traffic; give GB/s per degree, e.g. {2: 100}")
        if self.moe_bytes_per_token and self.ep_bandwidth_gbps <= 0:
            raise ValueError("ep_bandwidth_gbps: must be > 0 when moe_bytes_per_token > 0")
        if self.max_degree is not None and not is_power_of_two(self.max_degree):
            raise ValueError(f"max_degree: got {self.max_degree!r}; must be a power of two >= 1 or null")
        if self.group_sizes not in _GROUP_SIZES:
            raise ValueError(f"group_sizes: got {self.group_sizes!r}; allowed: 'pow2', 'any'")
        if not isinstance(self.name, str) or not isinstance(self.notes, str):
            raise ValueError("name and notes must be strings")

    def bandwidth(self, degree: int) -> float:
        """GB/s of a degree-``degree`` group; degrees above the table reuse its largest entry."""
        if degree in self.bandwidth_gbps:
            return self.bandwidth_gbps[degree]
        if self.bandwidth_gbps and degree > max(self.bandwidth_gbps):
            return self.bandwidth_gbps[max(self.bandwidth_gbps)]
        # A non-power-of-two group spans the topology of the next degree up (a group of 6 runs at
        # the 8-rank, intra-node bandwidth; one of 12 at the 16-rank, inter-node one).
        above = [d for d in self.bandwidth_gbps if d >= degree]
        if degree >= 2 and above and not is_power_of_two(degree):
            return self.bandwidth_gbps[min(above)]
        raise ValueError(f"bandwidth_gbps has no entry for degree {degree} (keys: {sorted(self.bandwidth_gbps)})")

    def seq_comm_fraction(self, degree: int) -> float:
        """f(d): the share of the group's token-proportional traffic each rank moves."""
        if degree == 1:
            return 0.0
        return 1.0 / degree if self.seq_comm == "alltoall" else (degree - 1) / degree

    def quad_coefficient(self, degree: int) -> float:
        """q(d)·quad_ms: ms per token² of one sequence's softmax work on a degree-``degree`` group."""
        return self.quad_ms if degree == 1 else self.quad_ms * self.quad_sp_factor

    def lin_coefficient(self, degree: int) -> float:
        """r(d)·lin_ms: ms per token of one sequence's other work on a degree-``degree`` group."""
        return self.lin_ms if degree == 1 else self.lin_ms * self.lin_sp_factor

    def seq_time_ms(self, length: int, degree: int) -> float:
        """t(s, d): time one sequence adds to a degree-``degree`` group, ms (beta and c(d) excluded)."""
        compute = (self.quad_coefficient(degree) * length * length + self.lin_coefficient(degree) * length) / degree
        moe = 0.0
        if self.moe_bytes_per_token:
            moe = self.moe_bytes_per_token * length / degree / _MIB / self.ep_bandwidth_gbps
        if degree == 1 or not self.comm_bytes_per_token:
            return compute + moe
        comm = self.comm_bytes_per_token * length * self.seq_comm_fraction(degree) / _MIB / self.bandwidth(degree)
        return compute + comm + moe

    def seq_times_ms(self, lengths: np.ndarray, degree: int) -> np.ndarray:
        """:meth:`seq_time_ms` of every length in ``lengths`` at once (float64 array, ms)."""
        s = np.asarray(lengths, dtype=np.float64)
        per_token = self.lin_coefficient(degree) / degree
        if self.moe_bytes_per_token:
            per_token += self.moe_bytes_per_token / degree / _MIB / self.ep_bandwidth_gbps
        if degree > 1 and self.comm_bytes_per_token:
            per_token += self.comm_bytes_per_token * self.seq_comm_fraction(degree) / _MIB / self.bandwidth(degree)
        return (self.quad_coefficient(degree) / degree) * s * s + per_token * s

    def group_overhead_ms(self, degree: int) -> float:
        """beta_ms + c(d): what a non-empty group pays whatever it runs, ms."""
        if degree == 1 or not self.comm_bytes_per_group:
            return self.beta_ms
        return self.beta_ms + self.comm_bytes_per_group * (degree - 1) / _MIB / self.bandwidth(degree)

    def group_time_ms(self, lengths: list[int], degree: int) -> float:
        """T(d) for the packed ``lengths`` (0 for an empty group), ms."""
        if not lengths:
            return 0.0
        return self.group_overhead_ms(degree) + sum(self.seq_time_ms(s, degree) for s in lengths)

    def step_time_ms(self, microbatch_ms: Iterable[float]) -> float:
        """A step's time: step_ms + Σ of its micro-batches' makespans (ms each), ms."""
        return self.step_ms + math.fsum(microbatch_ms)

    def rank_memory_mb_per_token(self, degree: int) -> float:
        """Memory per rank (MB) per token of the group's packed sequence."""
        return (self.act_mb_per_token + self.kv_gather_mb_per_token * (degree - 1)) / degree

    def group_memory_gb(self, lengths: list[int], degree: int) -> float:
        """M(d): memory per rank of a degree-``degree`` group running ``lengths``, GB."""
        return self.model_state_gb + sum(lengths) * self.rank_memory_mb_per_token(degree) / 1024

    def token_capacity(self, degree: int) -> int:
        """Largest Σ s a degree-``degree`` group can hold (0 above max_degree)."""
        if not is_power_of_two(degree) and not (self.group_sizes == "any" and _is_positive_int(degree)):
            raise ValueError(f"degree: got {degree!r}; SP degrees are powers of two (group_sizes='pow2')")
        if self.max_degree is not None and degree > self.max_degree:
            return 0
        free_mb = 1024 * (self.memory_budget_gb - self.model_state_gb)
        return math.floor(free_mb / self.rank_memory_mb_per_token(degree) + 1e-9)

    def fits(self, lengths: list[int], degree: int) -> bool:
        """Whether a degree-``degree`` group can run ``lengths``: memory, and degree ≤ max_degree."""
        if self.max_degree is not None and degree > self.max_degree:
            return False
        return sum(lengths) <= self.token_capacity(degree)

    def degrees(self, num_ranks: int) -> list[int]:
        """Allowed SP degrees on ``num_ranks`` ranks, ascending, up to min(num_ranks, max_degree):
        powers of two, or (group_sizes='any') every size, divisors of max_degree for all-to-all."""
        return list(self._degrees_up_to(num_ranks))

    def _degrees_up_to(self, num_ranks: int):
        limit = num_ranks if self.max_degree is None else min(num_ranks, self.max_degree)
        if self.group_sizes == "any":
            heads = self.max_degree if self.seq_comm == "alltoall" else None
            return (d for d in range(1, limit + 1) if heads is None or heads % d == 0)
        return (1 << i for i in range(limit.bit_length()) if 1 << i <= limit)

    def min_degree(self, length: int, num_ranks: int | None = None) -> int:
        """Smallest allowed degree whose group holds one sequence of ``length`` tokens.

        Raises ValueError when no degree up to min(num_ranks, max_degree) holds it.
        """
        limit = num_ranks if num_ranks is not None else (self.max_degree or 2**40)
        largest = 1
        for degree in self._degrees_up_to(limit):
            if self.token_capacity(degree) >= length:
                return degree
            largest = degree
            if degree > 2**20:
                break
        raise ValueError(
            f"a sequence of {length} tokens does not fit in any SP group: the largest allowed degree "
            f"{largest} holds {self.token_capacity(largest)} tokens "
            f"(memory_budget_gb={self.memory_budget_gb}, max_degree={self.max_degree})"
        )

    def max_sequence_length(self, num_ranks: int) -> int:
        """Longest sequence that fits on ``num_ranks`` ranks."""
        return max(self.token_capacity(d) for d in self.degrees(num_ranks))

    def to_json(self) -> str:
        """The coefficients as a JSON object (bandwidth keys become strings)."""
        data = dataclasses.asdict(self)
        data["bandwidth_gbps"] = {str(k): v for k, v in sorted(self.bandwidth_gbps.items())}
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, path_or_text: str | Path) -> CostModel:
        """Read a cost model from a JSON file path or a JSON string; bad fields raise ValueError."""
        text = str(path_or_text)
        if text.lstrip()[:1] not in ("{", "["):
            try:
                text = Path(path_or_text).read_text()
            except OSError as exc:
                raise ValueError(f"cost model: cannot read {path_or_text!s}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"cost model: invalid JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise ValueError("cost model: the JSON must be an object of fields")
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CostModel:
        """Build from a dict of fields, naming any unknown or missing one."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(key, names, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; known fields: {', '.join(names)}"
                raise ValueError(f"cost model: unknown field {key!r}{hint}")
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
        ]
        if missing:
            raise ValueError(f"cost model: missing field(s) {', '.join(missing)}")
        return cls(**data)

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        from planner import presets

        return sorted(presets.PRESETS)

    @classmethod
    def preset(cls, name: str, *, world_size: int | None = None) -> CostModel:
        """A named cost model; ``world_size`` re-shards its ZeRO model states for another cluster size."""
        from planner import presets

        if name not in presets.PRESETS:
            close = difflib.get_close_matches(name, presets.PRESETS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(f"unknown cost-model preset {name!r}; {hint}known: {', '.join(sorted(presets.PRESETS))}")
        return presets.PRESETS[name](world_size)


def _is_positive_int(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def _check_number(name: str, value: Any, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: got {value!r}; expected a finite number")
    if positive and value <= 0:
        raise ValueError(f"{name}: got {value!r}; must be > 0")
    if value < 0:
        raise ValueError(f"{name}: got {value!r}; must be >= 0")


def _parse_bandwidth(table: Any) -> dict[int, float]:
    """Normalise the bandwidth table: power-of-two int keys >= 2 (JSON gives strings), positive values."""
    if not isinstance(table, dict):
        raise ValueError(f"bandwidth_gbps: got {table!r}; expected an object {{degree: GB/s}}")
    parsed = {}
    for key, value in table.items():
        try:
            degree = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"bandwidth_gbps: key {key!r} is not an integer degree") from None
        if degree == 1:
            # A one-rank group communicates nothing; an entry for it (FlexSP writes 1e10) is ignored.
            continue
        if not is_power_of_two(degree):
            raise ValueError(f"bandwidth_gbps: key {key!r} is not a power-of-two degree")
        _check_number(f"bandwidth_gbps[{degree}]", value, positive=True)
        parsed[degree] = float(value)
    return dict(sorted(parsed.items()))
