"""The lines rank 0 prints before the first step: what is being trained, on what, how.

    seqmoe 0.1.0: run tiny-cpu -> runs/tiny-cpu (50 steps)
    model: 4 layers LLLS, d_model 128, MoE 8 experts top-2 (gru router, global balance); 2.34M parameters, ...
    data: embedded corpus, tokenizer bytes (vocab 256): train 4404 sequences / 6.95M tokens, validation 232 ...
    world: 4 ranks (gloo on cpu), ep_size 1, ZeRO stage 1
    plan: flexsp (combinatorial, highs for small slices, async) | cost model tiny-cpu: ... tokens per sequence

Active parameters are the ones one token uses: everything except the experts, plus ``top_k``
experts per MoE layer (Chain-of-Experts runs top_k / C experts in each of C iterations: still
top_k in all).
"""

from __future__ import annotations

from torch import nn

from parallel.context import ParallelContext
from planner.cost import CostModel
from runtime import __version__
from runtime.config import Config

__all__ = ["parameter_counts", "startup_lines"]

_EXPERT_KEY = ".deepspeed_experts."


def parameter_counts(model: nn.Module, config: Config) -> tuple[int, int]:
    """(total, active per token) over all ranks; this rank holds num_experts / ep_size experts per layer."""
    expert = dense = 0
    for name, p in model.named_parameters():
        if _EXPERT_KEY in name:
            expert += p.numel()
        else:
            dense += p.numel()
    if not expert:
        return dense, dense
    moe = config.moe
    total = dense + expert * moe.ep_size
    per_expert_layer = total - dense  # all experts of all layers
    active = dense + per_expert_layer * moe.top_k // moe.num_experts
    return total, active


def _millions(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{int(n):,}"


def _data_source(config: Config) -> str:
    d = config.data
    if d.source == "embedded":
        where = "embedded corpus"
    elif d.source == "jsonl":
        where = f"jsonl {d.path} (key {d.text_key!r})"
    else:
        where = f"megatron {d.path}"
    return f"{where}, tokenizer {d.tokenizer} (vocab {config.model.vocab_size})"


def startup_lines(config: Config, ctx: ParallelContext, dataset, model: nn.Module, cost: CostModel) -> list[str]:
    """The start-up report (one string per line)."""
    m, d, t, p = config.model, config.data, config.train, config.planner
    world_size = ctx.world_size
    total, active = parameter_counts(model, config)
    if m.ffn == "moe":
        e = config.moe
        chain = f", Chain-of-Experts C={e.chain_iterations}" if e.chain_iterations > 1 else ""
        kind = f"MoE {e.num_experts} experts top-{e.top_k} ({e.router} router, {e.balance} balance{chain})"
    else:
        kind = "dense SwiGLU"
    train_tokens, val_tokens = int(dataset.train.lengths.sum()), int(dataset.validation.lengths.sum())
    if p.mode == "static":
        policy = f"static SP degree {p.static_degree}"
    elif p.mode == "batch_adaptive":
        policy = "batch_adaptive (smallest SP degree that fits each batch)"
    else:
        policy = f"flexsp (combinatorial, {p.solver} for small slices, {'async' if p.async_plan else 'sync'})"
    capacity = cost.max_sequence_length(world_size)
    return [
        f"seqmoe {__version__}: run {config.name} -> {config.resolved_run_dir} ({t.steps} steps)",
        f"model: {m.num_layers} layers {m.layer_pattern}, d_model {m.d_model}, {kind}; "
        f"{_millions(total)} parameters, {_millions(active)} active per token",
        f"data: {_data_source(config)}: train {dataset.num_train_documents} sequences / {_millions(train_tokens)} "
        f"tokens, validation {dataset.num_validation_documents} / {_millions(val_tokens)} (fraction "
        f"{d.validation_fraction:g}); {d.global_batch_sequences} sequences per step, max_seq_len {d.max_seq_len} "
        f"({d.long_sequence_policy})",
        f"world: {world_size} rank{'s' if world_size > 1 else ''} ({ctx.backend} on {ctx.device}), "
        f"ep_size {config.moe.ep_size}, ZeRO stage {t.zero_stage}",
        f"plan: {policy} | cost model {cost.name} ({p.cost_model}): at most {capacity} tokens per sequence, "
        f"memory budget {cost.memory_budget_gb:.3g} GB per rank",
    ]
