"""A hybrid decoder LM built from a layer-pattern string, every attention layer sequence-parallel.

``model.layer_pattern`` ("LLLS", repeated to ``num_layers``) gives each layer's token mixer:
L = linear attention with a learned per-head decay (LASP-2, or LASP-1 / Ulysses by config),
S = softmax attention with RoPE and GQA (LASP-2H all-gather, or Ulysses). Each layer's FFN is a
SwiGLU MLP. Pre-norm residual blocks with RMSNorm, byte-level vocabulary, optional tied
embeddings.

One forward pass runs on one rank's shard of a packed micro-batch: ``tokens`` are that rank's
contiguous slice of the group's packed sequences and ``SPBatch`` says which group, where the
documents begin (``cu_seqlens`` of the whole packed sequence) and where this shard starts.
With a group of one rank this is an ordinary single-device model, and every op is exact, so
the model computes the same function whatever SP group runs it.

Shapes: B batch (1 when packed), T local tokens, D model width, H heads, K head dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel import comm
from parallel.comm import Group
from parallel.lasp2 import lasp2_attention
from parallel.ring import lasp1_attention
from parallel.softmax_sp import allgather_attention
from parallel.ulysses import ulysses_attention, ulysses_linear_attention
from runtime.config import ModelConfig, ParallelConfig

__all__ = ["HybridLM", "SPBatch", "build_model", "layer_kinds"]


@dataclass(frozen=True)
class SPBatch:
    """How this rank's shard sits in its SP group's packed sequence."""

    group: Group
    cu_seqlens: Tensor | None
    """Document boundaries of the group's whole packed sequence [0, ..., W*T] (None: one document)."""
    offset: int
    """Global position of this shard's first token in the packed sequence (group rank * T)."""

    @classmethod
    def single(cls, cu_seqlens: Tensor | None = None) -> SPBatch:
        return cls(comm.SOLO, cu_seqlens, 0)


def layer_kinds(config: ModelConfig) -> list[str]:
    """The mixer of each layer: the pattern repeated (and cut) to num_layers."""
    pattern = config.layer_pattern
    return [pattern[i % len(pattern)] for i in range(config.num_layers)]


def positions_in_documents(batch: SPBatch, T: int, device) -> Tensor:
    """[T] position of each local token inside its own document (RoPE restarts per document)."""
    global_T = torch.arange(batch.offset, batch.offset + T, device=device)
    if batch.cu_seqlens is None:
        return global_T
    starts = batch.cu_seqlens[:-1].to(device)
    doc_T = torch.bucketize(global_T, starts, right=True) - 1
    return global_T - starts[doc_T]


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

    def forward(self, x_BTD: Tensor, batch: SPBatch) -> Tensor:
        B, T, _ = x_BTD.shape
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.H, self.K).unbind(2)
        q, k = F.silu(q) / math.sqrt(self.K), F.silu(k)
        kwargs = {"group": batch.group, "log_decay": self.log_decay(x_BTD), "cu_seqlens": batch.cu_seqlens}
        if self.method == "lasp2":
            o = lasp2_attention(q, k, v, **kwargs)
        elif self.method == "lasp1":
            o = lasp1_attention(q, k, v, **kwargs)
        else:
            o = ulysses_linear_attention(q, k, v, **kwargs)
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

    def forward(self, x_BTD: Tensor, batch: SPBatch) -> Tensor:
        B, T, _ = x_BTD.shape
        pos_T = positions_in_documents(batch, T, x_BTD.device)
        q = apply_rope(self.q(x_BTD).view(B, T, self.H, self.K), pos_T, self.theta)
        k, v = self.kv(x_BTD).view(B, T, 2, self.Hkv, self.K).unbind(2)
        k = apply_rope(k, pos_T, self.theta)
        attend = allgather_attention if self.method == "allgather" else ulysses_attention
        o = attend(q, k, v, group=batch.group, cu_seqlens=batch.cu_seqlens)
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
    def __init__(self, kind: str, config: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        self.kind = kind
        self.mix_norm, self.ffn_norm = RMSNorm(config.d_model), RMSNorm(config.d_model)
        self.mix = LinearAttention(config, parallel) if kind == "L" else SoftmaxAttention(config, parallel)
        self.ffn = SwiGLU(config)

    def forward(self, x: Tensor, batch: SPBatch) -> Tensor:
        x = x + self.mix(self.mix_norm(x), batch)
        return x + self.ffn(self.ffn_norm(x))


class HybridLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(kind, config, parallel) for kind in layer_kinds(config))
        self.norm = RMSNorm(config.d_model)
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens_BT: Tensor, batch: SPBatch) -> Tensor:
        """Logits [B, T, vocab] of this rank's shard."""
        x = self.embed(tokens_BT)
        for block in self.blocks:
            x = block(x, batch)
        x = self.norm(x)
        return x @ self.embed.weight.T if self.head is None else self.head(x)


def build_model(config: ModelConfig, parallel: ParallelConfig) -> HybridLM:
    """The model of ``config``; MoE FFNs arrive with moe/ (a clear error until then)."""
    if config.ffn == "moe":
        raise ValueError(
            "model.ffn = 'moe' needs the MoE layer (moe/), which has not landed in this version; use --model.ffn=dense"
        )
    return HybridLM(config, parallel)
