"""Host reads and collectives of a real training step (DESIGN invariant 8).

A 2-rank gloo run of the dense hybrid model with static SP=2 runs one step (every micro-batch's
forward and backward, through ``runtime.step.run_plan``) at 4 and at 8 layers of "LLLS". While
the step runs, every Python-level device->host read is counted (``Tensor.item``, ``.tolist``,
``.cpu``, ``.numpy`` and ``bool``/``int``/``float``/``operator.index`` of a tensor) and so is
every collective (``parallel.comm.CommMeter``, which every collective in seqmoe goes through).

What must hold: the reads do not grow with the number of attention layers (the SP context is
built once per micro-batch from host ints; an attention layer reads nothing back), and the
collectives grow by exactly 2 per attention layer and micro-batch: one forward (LASP-2's state
all-gather, LASP-2H's K/V all-gather) and one backward (the dM all-gather, the dK/dV
reduce-scatter). The per-micro-batch agreement check is one more collective, independent of depth.

Reads are checked for every (linear, softmax) method pair the model offers: LASP-2 + LASP-2H,
the LASP-1 ring + Ulysses, Ulysses + LASP-2H.

Not covered here: the MoE layer's uneven all-to-all reads its split sizes from the device once
per layer (moe/experts.py; invariant 8 allows it), so an MoE model's reads grow by that per
layer; this test runs the dense model.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.gpu_check import count_host_reads  # the GPU check counts the same way
from parallel import comm
from tests.distributed import run_on_ranks

# the Tensor methods through which Python code reads a value back from the device


def _model_and_plan(ctx, num_layers: int, linear_sp: str, softmax_sp: str):
    from planner.plan import Group, MicroBatch, StepPlan
    from runtime.config import ModelConfig, ParallelConfig
    from runtime.model import build_model

    torch.manual_seed(0)
    config = ModelConfig(
        layer_pattern="LLLS",
        num_layers=num_layers,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        ffn="dense",
        linear_decay="per_token",
    )
    model = build_model(config, ParallelConfig(linear_sp=linear_sp, softmax_sp=softmax_sp))
    g = torch.Generator().manual_seed(1)
    lengths = [9, 14, 5, 11]
    sequences = [torch.randint(0, 256, (n,), generator=g) for n in lengths]
    ranks = tuple(range(ctx.world_size))
    # static SP = world size, two micro-batches with two (packed) documents each
    micro = [MicroBatch(groups=[Group(ranks, [0, 1])]), MicroBatch(groups=[Group(ranks, [2, 3])])]
    plan = StepPlan(micro, num_ranks=ctx.world_size, predicted_time_s=0.0, solver="static", solve_time_s=0.0)
    return model, plan, sequences


def training_step(model, ctx, plan, sequences):
    """One step's forward and backward over the plan (what the training loop runs per step,
    without the optimizer); retarget here when the step function changes."""
    from runtime.step import run_plan

    def backward(loss, last):
        loss.backward()

    return run_plan(model, ctx, plan, sequences, [0] * len(sequences), backward=backward)


def _count_step(ctx, num_layers: int, linear_sp: str = "lasp2", softmax_sp: str = "allgather"):
    model, plan, sequences = _model_and_plan(ctx, num_layers, linear_sp, softmax_sp)
    training_step(model, ctx, plan, sequences)  # warm-up: lazy initialisation is not per step
    model.zero_grad()
    with comm.CommMeter() as meter, count_host_reads() as reads:
        training_step(model, ctx, plan, sequences)
    return dict(reads), meter.calls, len(plan.microbatches)


def _attention_layers(num_layers: int) -> int:
    return num_layers  # every layer of "LLLS" has an attention (L or S) mixer


# (linear, softmax) SP methods; the first is the default and the one whose collectives are counted
METHODS = [("lasp2", "allgather"), ("lasp1", "ulysses"), ("ulysses", "allgather")]


@pytest.fixture(scope="module")
def all_counts():
    return {}


@pytest.fixture
def counts(request, all_counts):
    methods = getattr(request, "param", METHODS[0])
    if methods not in all_counts:
        all_counts[methods] = {n: run_on_ranks(2, _count_step, n, *methods) for n in (4, 8)}
    return all_counts[methods]


@pytest.mark.parametrize("counts", METHODS, indirect=True, ids=["-".join(m) for m in METHODS])
def test_host_reads_do_not_grow_with_attention_layers(counts):
    for rank in range(2):
        shallow, _, _ = counts[4][rank]
        deep, _, _ = counts[8][rank]
        assert sum(deep.values()) == sum(shallow.values()), (
            f"rank {rank}: host reads per step {shallow} at 4 layers, {deep} at 8 layers"
        )


def test_collectives_grow_by_one_forward_one_backward_per_attention_layer(counts):
    """LASP-2 and LASP-2H (the defaults); Ulysses moves q, k, v and o by four all-to-alls each way."""
    for rank in range(2):
        _, shallow, microbatches = counts[4][rank]
        _, deep, _ = counts[8][rank]
        extra_layers = _attention_layers(8) - _attention_layers(4)
        growth = sum(deep.values()) - sum(shallow.values())
        assert growth == 2 * extra_layers * microbatches, (
            f"rank {rank}: collectives {shallow} at 4 layers, {deep} at 8 layers"
        )


def test_host_read_counter_sees_reads():
    x = torch.ones(3)
    with count_host_reads() as reads:
        x.tolist()
        float(x.sum())
        bool(x[0] > 0)
    assert reads["tolist"] == 1 and reads["__float__"] == 1 and reads["__bool__"] == 1
    assert F.relu(x).sum().item() == 3.0  # methods are restored afterwards (not counted here)
