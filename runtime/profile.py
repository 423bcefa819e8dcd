"""Calibrate a cost model on the machine it runs on: ``seqmoe profile``.

For every power-of-two SP degree d up to the world size and several sequence lengths s, all
buddy groups of degree d run one sequence of s tokens through the real model's forward and
backward at the same time (as in training, groups share the machine), and the slowest rank's
time is recorded. At the two longest lengths every degree also runs groups that pack
PACKED_PIECES documents of distinct lengths into the same tokens, as training packs them: one
document per group makes s² and s grow together over the lengths, and the fit cannot tell the
softmax term from the per-token one. On tiny-cpu it put the superlinear growth of a rank's time
in its tokens into s²: eight 256-token documents in a degree-4 group took 0.91× the time of one
2,048-token document, where that fit predicted 0.66×, so it under-predicted the packed
micro-batches of training. The pieces are distinct because equal ones share one attention call
(parallel/doc_attention.py), a cheaper path than training's documents take: at d = 4, eight
distinct documents in 1,024 tokens cost 1.22× one document, eight equal ones 0.87×. The points
take turns in every repeat (a burst of load hits them all alike). The all-gather bandwidth of
each group size is measured the same way.

The communication volumes are not fitted: they follow from the model config (parallel/README.md
gives the formulas). What remains, t_measured - comm, is fitted by least squares to

    beta + (q(d) alpha1 Σs² + r(d) alpha2 Σs) / d,    q(1) = r(1) = 1

over the group's documents s, with non-negative coefficients (:func:`fit_spread`): the packed
points identify q(d > 1) = quad_sp_factor (the softmax work a spread document costs its
slowest rank, planner/cost.py) and the degrees identify r(d > 1) = lin_sp_factor (per-token
work of a spread sequence beyond its priced traffic). Where the data cannot identify q (no
packed points, or a softmax term fitted to 0), q is the softmax kernel's own ratio, the last
rank's piece at SP=d against the whole document at SP=1 (:func:`measure_quad_sp_factor`).
The report gives every point's relative error.

The per-step term step_ms and the per-micro-batch term beta_ms as training pays them: real
training steps through the DeepSpeed engine (runtime.step.train_step), of plans with 1, 2, 4
and 8 micro-batches, identify what a step pays once apart from what each micro-batch pays
(runtime/step_profile.py derives it): step - P = step_ms + M·δ over the bare-model prediction
P, and beta_ms = beta + δ. The report gives those steps' relative errors too. Every timing
also records the busiest rank's process CPU time, and the same fits to those give
``ProfileResult.cpu_cost``, a model that other jobs' load on a shared machine barely moves.

Memory: the activations saved for backward are counted per token with autograd's saved-tensor
hooks, model states follow from the parameter count and the ZeRO stage.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from parallel import comm
from parallel.context import ParallelContext
from parallel.scan import DEFAULT_PIECES
from parallel.sp_context import SPContext
from planner.cost import CostModel, is_power_of_two, zero_model_state_gb
from runtime.config import Config
from runtime.model import build_model, layer_kinds
from runtime.spawn import spawn_ranks
from runtime.step_profile import apply_step_fit, calibration_steps, measure_engine_steps

__all__ = [
    "PACKED_PIECES",
    "ProfileResult",
    "SpreadFit",
    "calibration_points",
    "comm_volumes",
    "fit_coefficients",
    "fit_spread",
    "measure_quad_sp_factor",
    "packed_lengths",
    "profile_cost_model",
]

PACKED_PIECES = (2, 8)
"""Documents per group of the packed calibration points, at each of the two longest lengths."""

Lengths = int | tuple[int, ...]
"""A calibration point's group: one sequence length, or the lengths of the documents packed in it."""


def _docs(lengths: Lengths) -> tuple[int, ...]:
    return (lengths,) if isinstance(lengths, int) else tuple(lengths)


def packed_lengths(total: int, pieces: int) -> tuple[int, ...]:
    """``pieces`` document lengths summing to ``total``, in proportions pieces : pieces + 1 : … :
    2·pieces − 1 (near-equal where ``total`` is too short for that). Distinct, as training's are:
    the per-document attention runs equal lengths as one batched call, so equal pieces would time
    a cheaper path than training's documents take."""
    weights = range(pieces, 2 * pieces)
    out = [total * w // sum(weights) for w in weights]
    if min(out) < 1:
        out = [total // pieces + (i < total % pieces) for i in range(pieces)]
    out[-1] += total - sum(out)
    return tuple(out)


def calibration_points(
    lengths: list[int], degrees: list[int], capacity: dict[int, int] | None = None
) -> list[tuple[int, Lengths]]:
    """The (degree, group) points the profile times: at every degree, each length it divides as
    one document, and the two longest of them also as PACKED_PIECES documents. With ``capacity``
    (tokens a group of each degree holds in memory), only lengths a group holds, where plans
    go: a rank's time grows faster than linearly in its tokens, so points beyond the capacity
    would bend the fit away from the groups the planner makes (the shortest length stays, so
    that every degree is measured)."""
    points: list[tuple[int, Lengths]] = []
    for d in degrees:
        usable = sorted(s for s in lengths if s % d == 0)
        if capacity is not None and d in capacity:
            usable = [s for s in usable if s <= capacity[d]] or usable[:1]
        points += [(d, s) for s in usable]
        points += [(d, packed_lengths(s, k)) for s in usable[-2:] for k in PACKED_PIECES if k < s]
    return points


@dataclass
class ProfileResult:
    cost: CostModel
    points: list[dict]
    """Each measured (degree, length, documents): measured and predicted ms and the relative error."""
    bandwidth_gbps: dict[int, float]
    step_points: list[dict] = field(default_factory=list)
    """Each calibration training step (runtime/step_profile.py): measured and predicted whole-step ms."""
    step_fit: dict = field(default_factory=dict)
    """S and δ of runtime/step_profile.py (2), and the same fit to the steps' forward + backward."""
    cpu_cost: CostModel | None = None
    """The same fit to the busiest rank's process CPU times instead of wall times: a load
    that time-shares the machine's cores stretches wall times, barely CPU times."""

    @property
    def mean_abs_rel_error(self) -> float:
        return statistics.fmean(abs(p["rel_error"]) for p in self.points)

    @property
    def step_mean_abs_rel_error(self) -> float:
        """Mean |relative error| of the calibration training steps under the final model."""
        return statistics.fmean(abs(p["rel_error"]) for p in self.step_points)

    @property
    def max_abs_rel_error(self) -> float:
        return max(abs(p["rel_error"]) for p in self.points)

    @property
    def warnings(self) -> list[str]:
        """What makes this fit unfit to plan with: timings that do not grow with the tokens leave
        the planner nothing to choose by (every plan costs the same)."""
        if self.cost.quad_ms == 0 and self.cost.lin_ms == 0:
            return [
                "the measured times do not grow with the tokens (softmax and per-token terms fitted to 0): "
                "the lengths are too short to time on this machine; profile longer --lengths"
            ]
        return []


def comm_volumes(config: Config, elem_bytes: int) -> tuple[str, float, float]:
    """(seq_comm kind, bytes per token, bytes per group) of one fwd + bwd, per the formulas of
    parallel/README.md, for the cost model's communication terms."""
    m, p = config.model, config.parallel
    head_dim = m.d_model // m.num_heads
    kinds = layer_kinds(m)
    num_linear, num_softmax, num_gdn = kinds.count("L"), kinds.count("S"), kinds.count("G")
    if p.linear_sp == "ulysses" and p.softmax_sp == "allgather" and (num_linear or num_gdn) and num_softmax:
        raise ValueError(
            "seqmoe profile models one kind of sequence-proportional traffic per model: combine "
            "parallel.linear_sp=ulysses with parallel.softmax_sp=ulysses, or use lasp2/lasp1 with allgather"
        )
    # LASP-2 / LASP-1: one fp32 state per peer per linear layer, forward and backward
    per_group = 0.0 if p.linear_sp == "ulysses" else num_linear * 2 * m.num_heads * head_dim * head_dim * 4
    # gated DeltaNet layers: LASP-2 gathers state + transition forward and dM backward (3 states'
    # worth per peer); the ring and scan pass one state each way
    if p.linear_sp != "ulysses":
        per_group += num_gdn * (3 if p.linear_sp == "lasp2" else 2) * m.num_heads * head_dim * head_dim * 4
    if p.linear_sp == "scan":  # pieces pipeline: a hop costs 1/pieces of a state (parallel/scan.py)
        per_group /= DEFAULT_PIECES
    if p.softmax_sp == "allgather":
        # K and V of every token, forward; their gradients, backward
        per_token = num_softmax * 2 * 2 * m.num_kv_heads * head_dim * elem_bytes
        return "allgather", float(per_token), float(per_group)
    # Ulysses: q, k, v, o forward and their gradients backward, all-to-all
    width = m.num_heads * head_dim
    per_token = (num_softmax + num_linear + num_gdn) * 2 * 4 * width * elem_bytes
    return "alltoall", float(per_token), float(per_group)


def _relative_nnls(rows: np.ndarray, target: np.ndarray) -> list[float]:
    """Coefficients >= 0 minimising the squared relative error of rows @ coef to target."""
    weights = 1.0 / np.maximum(target, 1e-9)  # relative error: long and short runs count alike
    active = list(range(rows.shape[1]))
    while True:
        coef, *_ = np.linalg.lstsq(rows[:, active] * weights[:, None], target * weights, rcond=None)
        if (coef >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(coef)))  # drop the most negative term and refit (a small NNLS)
    full = dict(zip(active, np.maximum(coef, 0.0)))
    return [float(full.get(i, 0.0)) for i in range(rows.shape[1])]


def fit_coefficients(
    points: list[tuple[int, Lengths, float]], *, quad_sp_factor: float = 1.0, lin_sp_factor: float = 1.0
) -> tuple[float, float, float]:
    """(alpha1, alpha2, beta) >= 0 minimising the squared relative error of
    beta + (q(d) alpha1 Σs² + r(d) alpha2 Σs)/d to the compute times ``(degree, lengths, ms)``
    (``lengths`` one length or the documents packed in the group), with q(1) = r(1) = 1 and
    q(d > 1), r(d > 1) the given factors."""
    beta, alpha1, alpha2, _, _ = _spread_terms(points, quad_sp_factor, lin_sp_factor)
    return alpha1, alpha2, beta


@dataclass(frozen=True)
class SpreadFit:
    """The bare model's compute coefficients (ms) and its factors above one rank."""

    alpha1: float
    alpha2: float
    beta: float
    quad_sp_factor: float
    lin_sp_factor: float
    quad_fitted: bool
    """q came from the data (packed points); otherwise it is the fallback given to :func:`fit_spread`."""


def _spread_terms(points, q: float | None, r: float | None) -> tuple[float, float, float, float | None, float | None]:
    """NNLS of the compute model with q and r free (None: a column of its own above one rank) or
    fixed; (beta, alpha1, alpha2, q, r), a free factor None when its d = 1 or d > 1 coefficient is 0."""
    rows = []
    for d, lengths, _ in points:
        s = np.array(_docs(lengths), dtype=np.float64)
        sq, tok, one = float(s @ s) / d, float(s.sum()) / d, d == 1
        quad = [sq if one else 0.0, 0.0 if one else sq] if q is None else [sq * (1.0 if one else q)]
        lin = [tok if one else 0.0, 0.0 if one else tok] if r is None else [tok * (1.0 if one else r)]
        rows.append([1.0, *quad, *lin])
    coef = _relative_nnls(np.array(rows), np.array([ms for _, _, ms in points]))
    beta, rest = coef[0], coef[1:]
    if q is None:
        alpha1, spread, rest = rest[0], rest[1], rest[2:]
        q = spread / alpha1 if alpha1 > 0 and spread > 0 else None
    else:
        alpha1, rest = rest[0], rest[1:]
    if r is None:
        alpha2, spread = rest[0], rest[1]
        r = spread / alpha2 if alpha2 > 0 and spread > 0 else None
    else:
        alpha2 = rest[0]
    return beta, alpha1, alpha2, q, r


def fit_spread(points: list[tuple[int, Lengths, float]], *, quad_sp_factor: float = 1.0) -> SpreadFit:
    """The compute model of :func:`fit_coefficients` with q(d > 1) and r(d > 1) fitted too:
    q when there are packed points both at d = 1 and above (else ``quad_sp_factor``, the
    kernel's ratio), r when there are points above one rank (else 1). A factor whose
    coefficient comes out 0 falls back the same way and the others are refitted."""
    packed = {d == 1 for d, lengths, _ in points if len(_docs(lengths)) > 1}
    spread = any(d > 1 for d, _, _ in points)
    q_free, r_free = packed == {True, False}, spread
    q = None if q_free else quad_sp_factor
    r = None if r_free else 1.0
    while True:
        beta, alpha1, alpha2, q_got, r_got = _spread_terms(points, q, r)
        if q is None and q_got is None:
            q, q_free = quad_sp_factor, False
        elif r is None and r_got is None:
            r = 1.0
        else:
            q_final, r_final = q_got if q is None else q, r_got if r is None else r
            return SpreadFit(alpha1, alpha2, beta, float(q_final), float(r_final), q_free)


def measure_quad_sp_factor(config: Config, length: int, degrees: list[int], repeats: int, device) -> float:
    """q(d > 1) of planner/cost.py for ``config``'s softmax layers: the per-document kernel
    (parallel.doc_attention) on the last rank of a degree-d group, whose T = s/d queries see
    all s keys of the document (computed in full under a bottom-right mask), times d, over the
    kernel on the whole document at d = 1; fwd + bwd, median of ``repeats``, mean over the
    degrees d > 1 of the median ratio (1.0 when there are none). Timed on this process alone."""
    from parallel.doc_attention import doc_attention

    m = config.model
    heads, kv_heads, head_dim = m.num_heads, m.num_kv_heads, m.d_model // m.num_heads
    g = torch.Generator().manual_seed(length)
    keys = [torch.randn(1, length, kv_heads, head_dim, generator=g).to(device) for _ in range(2)]

    def call(T: int) -> float:
        q = torch.randn(1, T, heads, head_dim, generator=g).to(device).requires_grad_()
        k, v = (x.clone().requires_grad_() for x in keys)
        start = time.perf_counter()
        o = doc_attention(q, k, v, q_offset=length - T, causal=True, bounds=None, scale=head_dim**-0.5)
        o.sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    split = [d for d in degrees if d > 1 and length % d == 0]
    if not split:
        return 1.0
    ratios: dict[int, list[float]] = {d: [] for d in split}
    for rep in range(repeats + 1):
        # interleaved, so that each ratio compares calls made under the same machine load
        whole = call(length)
        pieces = {d: call(length // d) for d in split}
        if rep:  # the first round warms up allocators
            for d in split:
                ratios[d].append(d * pieces[d] / whole)
    return statistics.fmean(statistics.median(r) for r in ratios.values())


def _degrees(world_size: int) -> list[int]:
    degrees, d = [], 1
    while d <= world_size:
        degrees.append(d)
        d *= 2
    return degrees


def _slowest(ctx: ParallelContext, seconds: float) -> float:
    if ctx.world_size == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=ctx.world)
    return t.item()


def _model_timer(ctx, model, degree: int, lengths: Lengths):
    """A call that times one fwd + bwd of the ``lengths`` packed into one sequence per degree-d
    group (per-document attention and state resets at their bounds, as in training) and returns
    the slowest rank's (wall ms, process CPU ms)."""
    ranks = ctx.buddy_group_of_degree(degree)
    group = ctx.group(ranks)
    docs = _docs(lengths)
    length = sum(docs)
    bounds = [0, *np.cumsum(docs).tolist()] if len(docs) > 1 else None
    T = length // degree
    g = torch.Generator().manual_seed(length)
    tokens = torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(ctx.device)
    index = ranks.index(ctx.rank)
    local = tokens[:, index * T : (index + 1) * T]
    batch = SPContext.build(group, local_len=T, bounds=bounds, device=ctx.device, rank=index, num_ranks=degree)

    def timed() -> tuple[float, float]:
        model.zero_grad(set_to_none=True)
        if ctx.world_size > 1:
            dist.barrier(group=ctx.world)
        start, cpu = time.perf_counter(), time.process_time()
        logits = model(local, batch).logits
        F.cross_entropy(logits.flatten(0, 1).float(), local.flatten()).backward()
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        return _slowest(ctx, wall) * 1e3, _slowest(ctx, cpu) * 1e3

    return timed


def _time_model_sweep(ctx, model, points: list[tuple[int, Lengths]], repeats: int) -> list[tuple[float, float]]:
    """Slowest rank's median (wall ms, CPU ms) of each ``(degree, lengths)`` point. The points take turns in
    every repeat, so that a burst of load on a shared machine lands on all of them alike
    instead of bending the fitted curve at the points it hit."""
    timers = [_model_timer(ctx, model, d, s) for d, s in points]
    samples: list[list[tuple[float, float]]] = [[] for _ in points]
    for rep in range(repeats + 1):
        for timer, got in zip(timers, samples):
            ms = timer()
            if rep:  # the first round warms up allocators and gloo connections
                got.append(ms)
    return [(statistics.median(w for w, _ in got), statistics.median(c for _, c in got)) for got in samples]


def _bandwidth(ctx, degree: int, nbytes: int = 4 << 20, repeats: int = 5) -> float:
    """GB/s of an all-gather on the degree-d groups: bytes each rank sends / time."""
    group = ctx.group(ctx.buddy_group_of_degree(degree))
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=ctx.device)
    times = []
    for _ in range(repeats + 1):
        if ctx.world_size > 1:
            dist.barrier(group=ctx.world)
        start = time.perf_counter()
        comm.dist_all_gather(x, group=group)
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(_slowest(ctx, time.perf_counter() - start))
    return (degree - 1) * nbytes / statistics.median(times[1:]) / 1e9


def _activation_mb_per_token(model, length: int, device) -> float:
    """MB of tensors autograd saves for backward, per token, on one rank (degree 1)."""
    saved = 0

    def pack(t: torch.Tensor):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    tokens = torch.randint(0, model.config.vocab_size, (1, length), device=device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(tokens, SPContext.single(length, device=device)).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())
    loss.backward()
    return saved / length / 2**20


def _memory_budget_gb(ctx, world_size: int) -> float:
    if ctx.device.type == "cuda":
        return 0.9 * torch.cuda.mem_get_info(ctx.device)[1] / 2**30
    import psutil

    # ranks of one node share its memory; keep a fifth for the OS, the data and the planner
    return 0.8 * psutil.virtual_memory().total / 2**30 / world_size


def _capacity(
    act_mb_per_token: float, budget_gb: float, model_state_gb: float, degrees: list[int]
) -> dict[int, int] | None:
    """Tokens a group of each degree holds under the measured memory (None: no room measured)."""
    if budget_gb <= model_state_gb:
        return None
    memory = CostModel(
        quad_ms=0.0,
        lin_ms=0.0,
        beta_ms=0.0,
        act_mb_per_token=act_mb_per_token,
        memory_budget_gb=budget_gb,
        model_state_gb=model_state_gb,
    )
    return {d: memory.token_capacity(d) for d in degrees}


def _worker(rank, world_size, store, job, out_queue):
    config, lengths, repeats, capacity = job
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    ctx = ParallelContext.initialize(
        backend=config.parallel.backend, device=config.parallel.device, init_method=f"file://{store}"
    )
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, config.parallel, config.moe).to(ctx.device)
    act = _activation_mb_per_token(model, min(lengths), ctx.device)
    budget = _memory_budget_gb(ctx, world_size)
    num_params = sum(p.numel() for p in model.parameters())
    if capacity is None:  # what the measured memory lets each group hold
        state_gb = zero_model_state_gb(num_params, zero_stage=config.train.zero_stage, world_size=world_size)
        capacity = _capacity(act, budget, state_gb, _degrees(world_size))
        if capacity is not None and world_size > 1:  # every rank must time the same points
            held = torch.tensor([capacity[d] for d in _degrees(world_size)], dtype=torch.int64)
            dist.all_reduce(held, op=dist.ReduceOp.MIN, group=ctx.world)
            capacity = dict(zip(_degrees(world_size), held.tolist()))
    points = calibration_points(lengths, _degrees(world_size), capacity)
    rows = [(d, s, *ms) for (d, s), ms in zip(points, _time_model_sweep(ctx, model, points, repeats))]
    bandwidth = {d: _bandwidth(ctx, d) for d in _degrees(world_size) if d > 1}
    engine_steps = measure_engine_steps(ctx, config, calibration_steps(lengths, _degrees(world_size)), repeats)
    quad_sp_factor = 1.0
    if rank == 0:  # alone, while the other ranks wait: a kernel ratio, not a shared-machine time
        quad_sp_factor = measure_quad_sp_factor(config, max(lengths), _degrees(world_size), max(repeats, 5), ctx.device)
    if world_size > 1:
        dist.barrier(group=ctx.world)
    if rank == 0:
        out_queue.put((rows, bandwidth, act, budget, num_params, str(ctx.device), engine_steps, quad_sp_factor))
    ctx.destroy()


def profile_cost_model(
    config: Config, *, world_size: int, lengths: list[int], repeats: int = 3, memory: CostModel | None = None
) -> ProfileResult:
    """Measure ``config``'s model on ``world_size`` local processes and fit a CostModel. Points
    are timed where a group fits in memory (:func:`calibration_points`): the measured memory, or
    ``memory``'s token capacity when the plans will use that model's memory side."""
    if not is_power_of_two(world_size):
        raise ValueError(f"profile needs a power-of-two number of processes, got {world_size}")
    if not lengths or any(s < world_size or s % world_size for s in lengths):
        raise ValueError(f"lengths must be multiples of the number of processes ({world_size}), got {lengths}")
    build_model(config.model, config.parallel, config.moe)  # config errors surface here, before any process starts
    capacity = None if memory is None else {d: memory.token_capacity(d) for d in _degrees(world_size)}
    job = (config, sorted(lengths), repeats, capacity)
    got = spawn_ranks(world_size, _worker, job, timeout_s=math.inf, what="profiling")
    rows, bandwidth, act, budget, num_params, device, engine_steps, quad_sp_factor = got
    elem_bytes = 2 if device.startswith("cuda") else 4
    seq_comm, per_token, per_group = comm_volumes(config, elem_bytes)
    probe = CostModel(
        quad_ms=0.0,
        lin_ms=0.0,
        beta_ms=0.0,
        act_mb_per_token=act,
        memory_budget_gb=budget,
        seq_comm=seq_comm,
        comm_bytes_per_token=per_token,
        comm_bytes_per_group=per_group,
        bandwidth_gbps=bandwidth,
    )
    model_state_gb = zero_model_state_gb(num_params, zero_stage=config.train.zero_stage, world_size=world_size)
    wall = [(d, s, ms) for d, s, ms, _ in rows]
    bare, stepped, whole, inside, quad_fitted = _fit(probe, wall, engine_steps, quad_sp_factor, "wall", model_state_gb)
    notes = (
        f"seqmoe profile on {world_size} x {device}: lengths {sorted(lengths)}, {repeats} repeats, "
        f"{num_params} parameters; step_ms and beta_ms from training steps of 1-8 micro-batches "
        "through the DeepSpeed engine (runtime/step_profile.py)"
    )
    cost = dataclasses.replace(stepped, name=f"{config.name}-profiled", notes=notes)
    cpu = [(d, s, ms) for d, s, _, ms in rows]
    cpu_bare, cpu_cost, _, _, _ = _fit(probe, cpu, engine_steps, quad_sp_factor, "cpu", model_state_gb)
    cpu_cost = dataclasses.replace(cpu_cost, name=f"{config.name}-profiled-cpu-time", notes=f"{notes}; CPU times")
    points = []
    for (d, lengths, ms), (_, _, cpu_ms) in zip(wall, cpu):  # bare timings against the bare fits (β before δ)
        docs = list(_docs(lengths))
        predicted = bare.group_time_ms(docs, d)
        points.append(
            {
                "degree": d,
                "length": sum(docs),
                "documents": len(docs),
                "docs": docs,
                "measured_ms": ms,
                "predicted_ms": predicted,
                "rel_error": (predicted - ms) / ms,
                "measured_cpu_ms": cpu_ms,
                "predicted_cpu_ms": cpu_bare.group_time_ms(docs, d),
            }
        )
    step_points = []
    for p in engine_steps:
        predicted = cost.step_time_ms(cost.group_time_ms([p.length], d) for d in p.degrees)
        step_points.append(
            {
                "microbatches": p.microbatches,
                "length": p.length,
                "degrees": list(p.degrees),
                "measured_ms": p.step_ms,
                "measured_fwd_bwd_ms": p.fwd_bwd_ms,
                "predicted_ms": predicted,
                "rel_error": (predicted - p.step_ms) / p.step_ms,
            }
        )
    step_fit = {
        "step_ms": whole.step_ms,
        "delta_beta_ms": whole.delta_ms,
        "bare_beta_ms": bare.beta_ms,
        "fwd_bwd_intercept_ms": inside.step_ms,
        "fwd_bwd_delta_beta_ms": inside.delta_ms,
        "quad_sp_factor_fitted": quad_fitted,
        "kernel_quad_sp_factor": quad_sp_factor,
    }
    return ProfileResult(cost, points, bandwidth, step_points, step_fit, cpu_cost)


def _fit(probe: CostModel, rows, steps, quad_sp_factor: float, clock: str, model_state_gb: float):
    """(bare fit, final model, whole-step fit, fwd + bwd fit, whether q was fitted) of ``rows``
    ``(d, lengths, ms)`` and the engine ``steps`` on ``clock`` ('wall' or 'cpu'), the
    communication terms of ``probe`` removed; ``quad_sp_factor`` is the kernel's q, the fallback."""
    compute = [(d, lengths, ms - probe.group_time_ms(list(_docs(lengths)), d)) for d, lengths, ms in rows]
    fit = fit_spread(compute, quad_sp_factor=quad_sp_factor)
    bare = dataclasses.replace(
        probe,
        quad_ms=fit.alpha1,
        lin_ms=fit.alpha2,
        beta_ms=fit.beta,
        quad_sp_factor=fit.quad_sp_factor,
        lin_sp_factor=fit.lin_sp_factor,
        model_state_gb=model_state_gb,
    )
    # runtime/step_profile.py (2): the engine steps' residuals over the bare model give S and δ
    stepped, whole, inside = apply_step_fit(bare, steps, clock=clock)
    return bare, stepped, whole, inside, fit.quad_fitted
