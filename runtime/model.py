"""A hybrid decoder LM built from a layer-pattern string, every attention layer sequence-parallel.

``model.layer_pattern`` ("LLLS", repeated to ``num_layers``) gives each layer's token mixer:
L = linear attention with a learned per-head decay (LASP-2, or LASP-1 / Ulysses by config),
S = softmax attention with RoPE and GQA (LASP-2H all-gather, or Ulysses), G = Gated DeltaNet
(runtime/deltanet.py). Each layer's FFN is a
SwiGLU MLP (``ffn = "dense"``) or an MoE layer (``ffn = "moe"``, moe/). Pre-norm residual blocks
with RMSNorm, byte-level vocabulary, optional tied embeddings.

One forward pass runs on one rank's shard of a packed micro-batch: ``tokens`` are that rank's
contiguous slice of the group's packed sequences and the micro-batch's ``SPContext``
(parallel/sp_context.py, built once per micro-batch from host ints) says which group, where the
documents begin and where this shard starts; it also carries the RoPE positions and the padding
mask. Every attention layer takes it and reads nothing back from the device. With a group of
one rank this is an ordinary single-device model, and every op is exact, so the model computes
the same function whatever SP group runs it.

Shapes: B batch (1 when packed), T local tokens, D model width, H heads, K head dim.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from moe.balance import BalanceLoss, BalanceTracker, SequenceLayout, sequence_ids
from moe.layer import MoELayer
from moe.metrics import RoutingMetrics
from moe.router import make_gru_cell
from parallel.comm import Group
from parallel.lasp2 import lasp2_attention_in_context
from parallel.ring import lasp1_attention_in_context
from parallel.scan import scan_attention_in_context
from parallel.softmax_sp import allgather_attention_in_context
from parallel.sp_context import SPContext
from parallel.ulysses import ulysses_attention_in_context, ulysses_linear_attention_in_context
from runtime.config import ModelConfig, MoEConfig, ParallelConfig
from runtime.deltanet import GatedDeltaNet

__all__ = ["HybridLM", "LMOutput", "SPBatch", "SPContext", "build_model", "layer_kinds"]

SPBatch = SPContext
"""The name this module used before the SP context moved to parallel/sp_context.py."""


class LMOutput(NamedTuple):
    """What a forward pass returns: ``logits, balance = model(tokens, batch)``."""

    logits: Tensor
    """[B, T, vocab] logits of this rank's shard."""
    balance: BalanceLoss
    """The MoE balance (+ z) loss of this forward as a value (zero for a dense model): the step
    takes ``balance.share(tokens=, sequences=)`` with the global batch's counts, a standalone
    caller ``balance.value()``."""


def layer_kinds(config: ModelConfig) -> list[str]:
    """The mixer of each layer: the pattern repeated (and cut) to num_layers."""
    pattern = config.layer_pattern
    return [pattern[i % len(pattern)] for i in range(config.num_layers)]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def apply_rope(x_BTHK: Tensor, pos_T: Tensor, theta: float) -> Tensor:
    K = x_BTHK.shape[-1]
    freqs_F = theta ** (-torch.arange(0, K, 2, device=x_BTHK.device, dtype=torch.float32) / K)
    angles_TF = pos_T.float()[:, None] * freqs_F[None, :]
    cos, sin = angles_TF.cos()[None, :, None, :], angles_TF.sin()[None, :, None, :]
    x1, x2 = x_BTHK.float()[..., 0::2], x_BTHK.float()[..., 1::2]
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.to(x_BTHK.dtype)


class LinearAttention(nn.Module):
    """Linear attention with a learned per-head decay a_h = -softplus(w_h) <= 0, SiLU feature
    map on q and k, and an RMSNorm on the output (unnormalised linear attention grows with T)."""

    def __init__(self, config: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        H, D = config.num_heads, config.d_model
        self.H, self.K = H, D // H
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.norm = RMSNorm(self.K)
        # decays spread over heads (slow to fast forgetting), as in lightning attention / RetNet
        init = torch.log(torch.expm1(torch.linspace(0.005, 0.2, H)))
        self.decay_param = nn.Parameter(init) if config.linear_decay != "none" else None
        self.per_token_gate = nn.Linear(D, H) if config.linear_decay == "per_token" else None
        self.method = parallel.linear_sp

    def log_decay(self, x_BTD: Tensor) -> Tensor | None:
        if self.decay_param is None:
            return None
        a_H = -F.softplus(self.decay_param)
        if self.per_token_gate is None:
            return a_H
        return a_H * torch.sigmoid(self.per_token_gate(x_BTD)).float()  # [B, T, H], still <= 0

    def forward(self, x_BTD: Tensor, sp: SPContext) -> Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.H, self.K).unbind(2)
        q, k = F.silu(q) / math.sqrt(self.K), F.silu(k)
        attend = {
            "lasp2": lasp2_attention_in_context,
            "lasp1": lasp1_attention_in_context,
            "scan": scan_attention_in_context,
            "ulysses": ulysses_linear_attention_in_context,
        }[self.method]
        o = attend(q, k, v, sp, log_decay=self.log_decay(x_BTD))
        return self.out(self.norm(o).reshape(B, T, -1))


class SoftmaxAttention(nn.Module):
    """Softmax attention with RoPE (positions restart in every document) and GQA."""

    def __init__(self, config: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        D, H, Hkv = config.d_model, config.num_heads, config.num_kv_heads
        self.H, self.Hkv, self.K = H, Hkv, D // H
        self.q = nn.Linear(D, H * self.K, bias=False)
        self.kv = nn.Linear(D, 2 * Hkv * self.K, bias=False)
        self.out = nn.Linear(H * self.K, D, bias=False)
        self.theta = config.rope_theta
        self.method = parallel.softmax_sp

    def forward(self, x_BTD: Tensor, sp: SPContext) -> Tensor:
        B, T, _ = x_BTD.shape
        q = apply_rope(self.q(x_BTD).view(B, T, self.H, self.K), sp.positions_T, self.theta)
        k, v = self.kv(x_BTD).view(B, T, 2, self.Hkv, self.K).unbind(2)
        k = apply_rope(k, sp.positions_T, self.theta)
        attend = allgather_attention_in_context if self.method == "allgather" else ulysses_attention_in_context
        o = attend(q, k, v, sp)
        return self.out(o.reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.up = nn.Linear(config.d_model, 2 * config.ffn_hidden, bias=False)
        self.down = nn.Linear(config.ffn_hidden, config.d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, kind: str, config: ModelConfig, parallel: ParallelConfig, ffn: nn.Module):
        super().__init__()
        self.kind = kind
        self.mix_norm, self.ffn_norm = RMSNorm(config.d_model), RMSNorm(config.d_model)
        mixers = {"L": LinearAttention, "S": SoftmaxAttention, "G": GatedDeltaNet}
        self.mix = mixers[kind](config, parallel)
        self.ffn = ffn

    def forward(self, x: Tensor, sp: SPContext, router_state: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        x = x + self.mix(self.mix_norm(x), sp)
        if isinstance(self.ffn, MoELayer):
            out, router_state = self.ffn(self.ffn_norm(x), router_state)
            return x + out, router_state
        return x + self.ffn(self.ffn_norm(x)), router_state


class HybridLM(nn.Module):
    """The decoder. With ``model.ffn = "moe"`` every block's FFN is an ``MoELayer``; the model
    owns the one GRU cell the recurrent routers share, and one ``BalanceTracker`` for all MoE
    layers (so the global balance counts of every layer travel in one all-reduce)."""

    def __init__(
        self,
        config: ModelConfig,
        parallel: ParallelConfig,
        moe: MoEConfig | None = None,
        *,
        balance_group: Group | None = None,
        ep_group: Group | None = None,
        seed: int = 0,
        domain_names: tuple[str, ...] = (),
    ):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        kinds = layer_kinds(config)
        self.gru_cell = None
        self.tracker = self.routing_metrics = None
        if config.ffn == "moe":
            moe = moe or MoEConfig()
            C = moe.chain_iterations
            sites = [f"layer{i}" if C == 1 else f"layer{i}.iter{t}" for i in range(len(kinds)) for t in range(C)]
            self.routing_metrics = RoutingMetrics(
                num_sites=len(sites), num_experts=moe.num_experts, site_names=sites, domain_names=domain_names
            )
            self.tracker = BalanceTracker(
                num_experts=moe.num_experts,
                top_k=moe.top_k // C,
                num_sites=len(sites),
                balance=moe.balance,
                coef=moe.balance_coef,
                z_loss_coef=moe.z_loss_coef,
                group=balance_group,
                metrics=self.routing_metrics,
            )
            if moe.router == "gru":
                self.gru_cell = make_gru_cell(moe.router_dim)
            ffns = [self._moe_layer(config, moe, i, ep_group, seed) for i in range(len(kinds))]
        else:
            ffns = [SwiGLU(config) for _ in kinds]
        self.blocks = nn.ModuleList(Block(kind, config, parallel, ffn) for kind, ffn in zip(kinds, ffns, strict=True))
        self.norm = RMSNorm(config.d_model)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)
        for block in self.blocks:
            if isinstance(block.ffn, MoELayer):
                block.ffn.reset_parameters()  # per-expert generators: see moe/layer.py

    def _moe_layer(self, config: ModelConfig, moe: MoEConfig, index: int, ep_group: Group | None, seed: int):
        return MoELayer(
            config.d_model,
            config.ffn_hidden,
            num_experts=moe.num_experts,
            top_k=moe.top_k,
            router=moe.router,
            router_dim=moe.router_dim,
            gru_cell=self.gru_cell,
            balance=moe.balance,
            balance_coef=moe.balance_coef,
            z_loss_coef=moe.z_loss_coef,
            chain_iterations=moe.chain_iterations,
            chain_norm_topk_prob=moe.chain_norm_topk_prob,
            shared_expert=moe.shared_expert,
            ep_size=moe.ep_size,
            expert_compute=moe.expert_compute,
            ep_group=ep_group,
            tracker=self.tracker,
            layer_index=index,
            seed=seed,
        )

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(
        self, tokens_BT: Tensor, batch: SPContext, *, domains_T: Tensor | None = None, valid_T: Tensor | None = None
    ) -> LMOutput:
        """Logits of this rank's shard and the MoE balance loss of this forward (``LMOutput``).
        ``valid_T`` (False on padding; default: the context's, None when there is none) keeps
        padding tokens out of the balance loss and metrics; ``domains_T`` labels tokens for the
        per-domain routing metric. The gradient-accumulation buffer of the global balance loss
        is the step's to reset (``tracker.begin_step()``, runtime/step.py ``train_step``)."""
        if tokens_BT.shape[1] != batch.local_len:
            raise ValueError(
                f"HybridLM: tokens hold {tokens_BT.shape[1]} tokens per row but the SP context was built for "
                f"local_len={batch.local_len}; build it for this shard"
            )
        valid_T = batch.valid_T if valid_T is None else valid_T
        if self.tracker is not None:
            sequence = None
            if self.tracker.balance == "sequence":
                num_local = tokens_BT.numel()
                seq_T = sequence_ids(batch.cu_seqlens, batch.offset, num_local, device=tokens_BT.device)
                group = None if batch.num_ranks == 1 else batch.group
                sequence = SequenceLayout(seq_T, batch.num_documents, group)
            self.tracker.begin_microbatch(sequence=sequence, domains_T=domains_T, valid_T=valid_T)
        x = self.embed(tokens_BT)
        router_state = None
        for block in self.blocks:
            if self.config.activation_checkpointing and torch.is_grad_enabled():
                # the router state is an explicit input, so its gradient survives the recompute
                x, router_state = checkpoint(block, x, batch, router_state, use_reentrant=False)
            else:
                x, router_state = block(x, batch, router_state)
        x = self.norm(x)
        logits = x @ self.embed.weight.T if self.head is None else self.head(x)
        if self.tracker is None:
            return LMOutput(logits, BalanceLoss.zero(logits.device))
        return LMOutput(logits, self.tracker.result())  # zero under no_grad: evaluation only observes


def build_model(
    config: ModelConfig,
    parallel: ParallelConfig,
    moe: MoEConfig | None = None,
    *,
    balance_group: Group | None = None,
    ep_group: Group | None = None,
    seed: int = 0,
    domain_names: tuple[str, ...] = (),
) -> HybridLM:
    """The model of ``config``. ``balance_group``: the ranks the global balance loss counts over
    (all ranks in training; None = this process only). ``ep_group``: this rank's expert-parallel
    group (default: made through DeepSpeed when ``moe.ep_size`` > 1)."""
    if config.ffn == "moe":
        moe = moe or MoEConfig()
        moe.validate()
    return HybridLM(
        config, parallel, moe, balance_group=balance_group, ep_group=ep_group, seed=seed, domain_names=domain_names
    )
