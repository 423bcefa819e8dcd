"""Named cost models: FlexSP's published GPT-7B coefficients and FLOP-derived ones for our models.

Each builder takes the world size (None = the preset's own cluster) because ZeRO shards the
model states over all ranks, so memory per rank depends on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from planner.cost import CostModel, zero_model_state_gb

__all__ = ["PRESETS", "HybridShape", "cpu_cost_model", "flops_cost_model", "machine_memory_bytes"]

_KIB = 1024
# FlexSP artefact (train_dist.py): GPT-7B model states, 7 x 16 = 112 GB before ZeRO-3 sharding.
ARTEFACT_MODEL_STATE_GB = 7 * 16.0
# Share of this machine's physical memory that `auto` on CPU gives the ranks on it (the rest is
# for the OS, the data, the Python processes themselves and gloo's buffers).
CPU_MEMORY_SHARE = 0.5
# Per-document softmax attention on CPU (parallel/doc_attention.py): the piece of a document that
# began on an earlier rank is computed in full under a mask at c_br ≈ 38–50 ns per entry and head,
# against c_sq ≈ 23–28 ns for a document inside one rank (fp32, head_dim 64, fwd + bwd, measured
# by the kernels benchmark on a 2-core CPU), so the last rank of an SP group does c_br/c_sq ≈ 1.6–1.8
# times quad_ms·s²/d (planner/cost.py, q(d)). `seqmoe profile` measures it for a given model and
# machine (runtime.profile.measure_quad_sp_factor; the tiny-cpu model, head_dim 32: ≈ 2.2 at 2048
# tokens, d = 2 and 4, on the same loaded 2-core machine).
CPU_QUAD_SP_FACTOR = 1.7


def flexsp_gpt7b_a100(world_size: int | None = None) -> CostModel:
    """GPT-7B on A100-40GB, coefficients of the FlexSP artefact (PKU-DAIR/Hetu-Galvatron@flexsp,
    galvatron/flexsp_solver/solver.py and models/gpt_hf/train_dist.py)."""
    world_size = world_size or 64
    layers, hidden = 32, 4096
    return CostModel(
        name="flexsp-gpt7b-a100",
        quad_ms=5.128e-6,
        lin_ms=0.1839576,
        beta_ms=629.3563,
        act_mb_per_token=4.480441895,
        memory_budget_gb=28.0,
        # The artefact's own count: 7 (billion parameters) x 16 bytes = 112 "GB" of model states,
        # sharded over all GPUs (ZeRO-3), against a budget in GB of 1024 MB.
        model_state_gb=ARTEFACT_MODEL_STATE_GB / world_size,
        seq_comm="alltoall",
        # Ulysses: 4 tensors (q, k, v, o) x 2 (fwd + bwd) x L x h x 2 bytes per token, f(d) = 1/d.
        comm_bytes_per_token=4 * 2 * layers * hidden * 2,
        bandwidth_gbps={2: 119.54, 4: 104.07, 8: 96.5, 16: 10.33, 32: 5.94, 64: 4.87},
        # The artefact's GPT-7B has 64 heads of 64 dimensions so that Ulysses reaches SP=64.
        max_degree=64,
        notes=(
            "FlexSP artefact GPT-7B / A100-40GB ('2 IB' bandwidth profile, 8 GPUs per node). "
            f"ZeRO-3 over {world_size} GPUs, model states counted as the artefact does: 7 x 16 GB = 112 GB "
            "(16 bytes/param mixed-precision Adam, 1e9 params per 'GB'), i.e. 1.75 GB per GPU at 64 GPUs and "
            "5,999 tokens/GPU from (28 - 1.75) x 1024 / 4.48. Bandwidths in the artefact's units "
            "(MiB / 'GB/s' = ms); degrees above 64 reuse the 64-GPU value."
        ),
    )


@dataclass(frozen=True, kw_only=True)
class HybridShape:
    """What the FLOP count needs to know about a hybrid linear/softmax attention + MoE model."""

    num_layers: int
    layer_pattern: str
    d_model: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    ffn_hidden: int
    """Hidden size of one SwiGLU expert (or of the dense MLP when num_experts == 1)."""
    num_experts: int
    top_k: int
    ep_size: int
    linear_chunk: int = 64
    act_bytes: int = 2
    state_bytes: int = 4

    @classmethod
    def of_model(cls, model, moe, *, act_bytes: int = 2) -> HybridShape:
        """From a model config and an MoE config (anything with runtime.config's field names)."""
        experts = moe.num_experts if model.ffn == "moe" else 1
        return cls(
            num_layers=model.num_layers,
            layer_pattern=model.layer_pattern,
            d_model=model.d_model,
            num_heads=model.num_heads,
            num_kv_heads=model.num_kv_heads,
            vocab_size=model.vocab_size,
            ffn_hidden=model.ffn_hidden,
            num_experts=experts,
            top_k=moe.top_k if experts > 1 else 1,
            ep_size=moe.ep_size if experts > 1 else 1,
            act_bytes=act_bytes,
        )

    @property
    def num_softmax(self) -> int:
        pattern = (self.layer_pattern * self.num_layers)[: self.num_layers]
        return pattern.count("S")

    @property
    def num_linear(self) -> int:
        return self.num_layers - self.num_softmax

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def params(self) -> tuple[float, float]:
        """(total, active per token) parameter counts."""
        d, kv = self.d_model, self.num_kv_heads * self.head_dim
        attention = 2 * d * d + 2 * d * kv
        expert = 3 * d * self.ffn_hidden
        router = d * self.num_experts if self.num_experts > 1 else 0
        embeddings = 2 * self.vocab_size * d
        total = self.num_layers * (attention + self.num_experts * expert + router) + embeddings
        active = self.num_layers * (attention + self.top_k * expert + router) + embeddings
        return float(total), float(active)


def flops_cost_model(
    shape: HybridShape,
    *,
    name: str,
    flops_per_s: float,
    beta_ms: float,
    memory_budget_gb: float,
    world_size: int,
    zero_stage: int,
    bandwidth_gbps: dict[int, float],
    ep_bandwidth_gbps: float,
    notes: str,
    quad_sp_factor: float = 1.0,
) -> CostModel:
    """Coefficients derived from FLOP and byte counts at an achievable throughput ``flops_per_s``.

    Compute (fwd + bwd = 3x fwd FLOPs, 3.5x for flash attention, which recomputes in bwd):
      lin  = [6·N_active + 3·L_lin·(4·d·head_dim + 2·C·d)] / throughput   (matmuls; chunked linear
             attention: state update/readout 4·d·head_dim and the causal intra-chunk part 2·C·d)
      quad = 3.5·L_soft·2·d / throughput   (causal QKᵀ and AV: 2·s²·d FLOPs per layer fwd)
    Traffic (bf16 activations, fp32 states, fwd + bwd):
      LASP-2H K/V all-gather + reduce-scatter of dK/dV: 2 · L_soft · 2·kv_dim·2 bytes per token
      LASP-2 state all-gather fwd + bwd:                2 · L_lin · heads·head_dim²·4 bytes per peer
      MoE dispatch + combine, fwd + bwd:                4 · top_k · d·2 bytes · L · (ep−1)/ep per token
    Memory: no activation checkpointing, ≈34·d bytes per layer per token (Korthikanti et al. 2022
    with flash attention: no s² term) plus top_k expert inputs and SwiGLU hidden states, plus
    fp32 logits; transient gathered K/V and their gradients of one softmax layer.
    ``quad_sp_factor``: q(d > 1) of planner/cost.py (1 for kernels that split the work evenly).
    """
    d, kv_dim, head_dim = shape.d_model, shape.num_kv_heads * shape.head_dim, shape.head_dim
    _, active = shape.params()
    ms_per_flop = 1e3 / flops_per_s
    linear_attention = 3 * shape.num_linear * (4 * d * head_dim + 2 * shape.linear_chunk * d)
    moe_fraction = (shape.ep_size - 1) / shape.ep_size if shape.num_experts > 1 else 0.0
    layer_act = 34 * d + shape.top_k * shape.act_bytes * (d + 3 * shape.ffn_hidden)
    act_bytes = shape.num_layers * layer_act + 4 * shape.vocab_size
    return CostModel(
        name=name,
        quad_ms=3.5 * shape.num_softmax * 2 * d * ms_per_flop,
        quad_sp_factor=quad_sp_factor,
        lin_ms=(6 * active + linear_attention) * ms_per_flop,
        beta_ms=beta_ms,
        act_mb_per_token=act_bytes / 2**20,
        memory_budget_gb=memory_budget_gb,
        model_state_gb=zero_model_state_gb(shape.params()[0], zero_stage=zero_stage, world_size=world_size),
        seq_comm="allgather",
        comm_bytes_per_token=2 * shape.num_softmax * 2 * kv_dim * shape.act_bytes,
        comm_bytes_per_group=2 * shape.num_linear * shape.num_heads * head_dim * head_dim * shape.state_bytes,
        moe_bytes_per_token=4 * shape.top_k * d * shape.act_bytes * shape.num_layers * moe_fraction,
        ep_bandwidth_gbps=ep_bandwidth_gbps,
        bandwidth_gbps=bandwidth_gbps,
        kv_gather_mb_per_token=2 * 2 * kv_dim * shape.act_bytes / 2**20,
        max_degree=None,
        notes=notes,
    )


HYBRID_1B = HybridShape(
    num_layers=24,
    layer_pattern="LLLS",
    d_model=2048,
    num_heads=16,
    num_kv_heads=8,
    vocab_size=32000,
    ffn_hidden=768,
    num_experts=8,
    top_k=2,
    ep_size=8,
)


def hybrid_1b_h100(world_size: int | None = None) -> CostModel:
    """Our 1.3B-total / 0.6B-active hybrid MoE on 8xH100-80GB nodes (derived, not measured)."""
    world_size = world_size or 8
    total, active = HYBRID_1B.params()
    return flops_cost_model(
        HYBRID_1B,
        name="hybrid-1b-h100",
        # 40% of the H100 SXM dense BF16 peak (989 TFLOP/s): a typical achieved MFU for MoE training.
        flops_per_s=0.40 * 989e12,
        # About 3 launches of ~20 kernels per layer at ~10 us, plus the optimizer-free per-micro-batch work.
        beta_ms=15.0,
        # 80 GB less ~10 GB for the CUDA context, NCCL buffers and fragmentation.
        memory_budget_gb=70.0,
        world_size=world_size,
        zero_stage=1,
        # NVLink 4 (~300 GB/s achievable per direction in collectives) inside a node; across
        # nodes one 200 Gb/s IB NIC per GPU, ~25 GB/s.
        bandwidth_gbps={2: 300.0, 4: 300.0, 8: 300.0, 16: 25.0},
        ep_bandwidth_gbps=300.0,
        notes=(
            f"Derived from FLOP counts (planner/presets.py::flops_cost_model), not measured: 24 layers LLLS, "
            f"d_model 2048, 16 heads, 8 KV heads, 8 experts (SwiGLU hidden 768) top-2, EP 8 inside a node, "
            f"vocab 32000; {total / 1e9:.2f}B params total, {active / 1e9:.2f}B active per token; "
            f"396 TFLOP/s achievable (40% of 989 BF16 peak); ZeRO-1 over {world_size} GPUs; 70 of 80 GB usable; "
            "NVLink 300 GB/s inside 8-GPU nodes, IB 25 GB/s per GPU across nodes. Replace with "
            "`seqmoe profile` measurements before trusting absolute times."
        ),
    )


TINY_CPU = HybridShape(
    num_layers=4,
    layer_pattern="LLLS",
    d_model=128,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=256,
    ffn_hidden=256,
    num_experts=8,
    top_k=2,
    ep_size=1,
    act_bytes=4,
)


def tiny_cpu(world_size: int | None = None) -> CostModel:
    """configs/tiny-cpu.toml on CPU processes over gloo: placeholder coefficients for the demo."""
    world_size = world_size or 4
    return flops_cost_model(
        TINY_CPU,
        name="tiny-cpu",
        # Small fp32 matmuls on one core per process.
        flops_per_s=5e9,
        # Python and gloo latency dominate a tiny model: tens of ms per micro-batch.
        beta_ms=50.0,
        # A synthetic cap (not the machine's RAM), about 630 tokens per rank, so that the
        # 1024-token sequences of the demo need SP groups and the plan mixes degrees. The cap
        # is on activations: the ZeRO-sharded model states come on top, whatever the world size.
        memory_budget_gb=0.05
        - zero_model_state_gb(TINY_CPU.params()[0], zero_stage=1, world_size=4)
        + zero_model_state_gb(TINY_CPU.params()[0], zero_stage=1, world_size=world_size),
        world_size=world_size,
        zero_stage=1,
        bandwidth_gbps={2: 1.0, 4: 1.0, 8: 1.0},
        ep_bandwidth_gbps=1.0,
        quad_sp_factor=CPU_QUAD_SP_FACTOR,
        notes=(
            "Placeholder for configs/tiny-cpu.toml (4 layers LLLS, d_model 128, 8 experts top-2, fp32) on "
            "gloo CPU processes: FLOP-derived at 5 GFLOP/s, beta 50 ms, 1 GB/s, SP quadratic factor 1.7, and "
            "a synthetic 0.05 GB memory cap (about 630 tokens per rank) so that the demo mixes SP degrees. "
            "To be replaced by "
            "`seqmoe profile` calibration."
        ),
    )


def machine_memory_bytes() -> int:
    """Physical memory of this machine (bytes), from os.sysconf; psutil where sysconf lacks it."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        import psutil

        return int(psutil.virtual_memory().total)


def cpu_cost_model(
    shape: HybridShape,
    *,
    world_size: int,
    ranks_per_machine: int,
    zero_stage: int = 1,
    memory_bytes: int | None = None,
) -> CostModel:
    """`auto` on CPU: the tiny-cpu timing coefficients for ``shape`` (fp32 activations), with a
    memory budget per rank of CPU_MEMORY_SHARE of this machine's physical memory split over the
    ``ranks_per_machine`` processes on it (``memory_bytes`` overrides the machine's)."""
    if ranks_per_machine < 1:
        raise ValueError(f"ranks_per_machine: got {ranks_per_machine}; must be >= 1")
    total = machine_memory_bytes() if memory_bytes is None else memory_bytes
    budget_gb = CPU_MEMORY_SHARE * total / ranks_per_machine / 2**30
    states_gb = zero_model_state_gb(shape.params()[0], zero_stage=zero_stage, world_size=world_size)
    if budget_gb <= states_gb:
        raise ValueError(
            f"cost model auto: {budget_gb:.2f} GB per rank ({CPU_MEMORY_SHARE:.0%} of {total / 2**30:.1f} GB over "
            f"{ranks_per_machine} ranks) does not hold the model states ({states_gb:.2f} GB); "
            "use fewer ranks per machine"
        )
    return flops_cost_model(
        shape,
        name="cpu-auto",
        flops_per_s=5e9,
        beta_ms=50.0,
        memory_budget_gb=budget_gb,
        world_size=world_size,
        zero_stage=zero_stage,
        bandwidth_gbps={2: 1.0},
        ep_bandwidth_gbps=1.0,
        quad_sp_factor=CPU_QUAD_SP_FACTOR,
        notes=(
            f"auto on CPU: FLOP-derived at 5 GFLOP/s, beta 50 ms, 1 GB/s (as tiny-cpu); memory budget "
            f"{budget_gb:.2f} GB per rank = {CPU_MEMORY_SHARE:.0%} of this machine's {total / 2**30:.1f} GB over "
            f"{ranks_per_machine} ranks. Replace with `seqmoe profile` calibration for timings."
        ),
    )


PRESETS: dict[str, Callable[[int | None], CostModel]] = {
    "flexsp-gpt7b-a100": flexsp_gpt7b_a100,
    "hybrid-1b-h100": hybrid_1b_h100,
    "tiny-cpu": tiny_cpu,
}
