"""The Gated DeltaNet token mixer (layer letter ``G``), sequence-parallel.

As Gated DeltaNet (Yang, Kautz, Hatamizadeh, ICLR 2025) and fla's ``GatedDeltaNet`` layer define it:

    q, k, v = SiLU(causal depthwise conv_4(W_q x)), ... (one short conv per projection)
    q, k    = L2-normalised per head; q also scaled by 1/sqrt(K) (fla's kernel default scale)
    beta    = sigmoid(W_beta x)                                   [B, T, H]
    g       = -exp(A_log) * softplus(W_a x + dt_bias)  (<= 0)     [B, T, H]   (Mamba2-style gate)
    o       = gated delta rule(q, k, v, beta, g)                  (parallel/delta_rule.py)
    y       = W_o (RMSNorm_head(o) * SiLU(W_g x))

Left out compared with fla's layer: separate key/value head dims (here V = K = d_model / H), more
value heads than key heads (GVA), biases in the convolutions, and fla's fused kernels.

The convolution of rank r's first tokens needs the last (kernel - 1) pre-convolution inputs of
the ranks before it in the SP group (and none across a document start): a P2P shift of those
tokens from rank r-1 (autograd: the gradient travels back), or a tiny all-gather when the local
shard is shorter than the halo. Inputs before a token's document start are masked out.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parallel import comm
from parallel.lasp2_delta import lasp2_delta_rule_attention_in_context
from parallel.scan import scan_delta_rule_attention_in_context
from parallel.sp_context import SPContext
from parallel.ulysses_delta import ulysses_delta_rule_attention_in_context

if TYPE_CHECKING:
    from runtime.config import ModelConfig, ParallelConfig

__all__ = ["GatedDeltaNet", "causal_conv", "conv_left_context"]

CONV_KERNEL = 4


def conv_left_context(x_BTC: Tensor, width: int, group: comm.Group) -> Tensor:
    """[B, width, C]: the ``width`` tokens just before this shard, from the previous ranks of the
    SP group (zeros before the sequence's start). Differentiable: the gradient goes back."""
    W, r = comm.group_size(group), comm.group_rank(group)
    B, T, C = x_BTC.shape
    if W == 1:
        return x_BTC.new_zeros(B, width, C)
    if width <= T:  # the common case: one P2P shift from rank r-1
        tail = x_BTC[:, T - width :].contiguous()
        return comm.send_recv(tail, group=group, dst=r + 1 if r + 1 < W else None, src=r - 1 if r > 0 else None)
    # shards shorter than the halo: every rank's whole shard, all-gathered (tiny)
    every_BWTC = comm.all_gather(x_BTC.contiguous(), group=group, dim=1)
    before = torch.cat([x_BTC.new_zeros(B, width, C), every_BWTC[:, : r * T]], dim=1)
    return before[:, before.shape[1] - width :]


def causal_conv(x_BTC: Tensor, halo_BLC: Tensor, weight_CK: Tensor, pos_T: Tensor) -> Tensor:
    """Depthwise causal convolution: out_t = sum_j w[:, K-1-j] x_{t-j} over lags j < K that stay
    inside the token's document (pos_T >= j)."""
    K = weight_CK.shape[1]
    T = x_BTC.shape[1]
    ext = torch.cat([halo_BLC, x_BTC], dim=1)  # halo has K-1 tokens
    out = 0
    for lag in range(K):
        tap = ext[:, K - 1 - lag : K - 1 - lag + T] * weight_CK[:, K - 1 - lag]
        out = out + (tap if lag == 0 else tap * (pos_T >= lag)[None, :, None].to(tap.dtype))
    return out


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig, parallel: ParallelConfig):
        super().__init__()
        H, D = config.num_heads, config.d_model
        self.H, self.K = H, D // H
        self.qkv = nn.Linear(D, 3 * D, bias=False)
        self.conv = nn.Parameter(torch.empty(3 * D, CONV_KERNEL))
        nn.init.kaiming_uniform_(self.conv, a=math.sqrt(5))  # nn.Conv1d's default
        self.beta_proj = nn.Linear(D, H, bias=False)
        self.a_proj = nn.Linear(D, H, bias=False)
        self.gate_proj = nn.Linear(D, D, bias=False)
        self.out = nn.Linear(D, D, bias=False)
        self.norm_weight = nn.Parameter(torch.ones(self.K))
        # Mamba2 / Gated DeltaNet initialisation: A ~ U[1, 16], dt ~ logU[1e-3, 1e-1] through softplus
        gen = torch.Generator().manual_seed(H)
        self.A_log = nn.Parameter(torch.log(torch.empty(H).uniform_(1, 16, generator=gen)))
        dt = torch.exp(torch.rand(H, generator=gen) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.method = parallel.linear_sp

    def gates(self, x_BTD: Tensor) -> tuple[Tensor, Tensor]:
        """(beta in (0, 1), log-decay g <= 0), both [B, T, H] in fp32."""
        beta = torch.sigmoid(self.beta_proj(x_BTD).float())
        g = -self.A_log.float().exp() * F.softplus(self.a_proj(x_BTD).float() + self.dt_bias.float())
        return beta, g

    def forward(self, x_BTD: Tensor, sp: SPContext) -> Tensor:
        B, T, D = x_BTD.shape
        H, K = self.H, self.K
        qkv = self.qkv(x_BTD)
        halo = conv_left_context(qkv, CONV_KERNEL - 1, sp.group)
        qkv = F.silu(causal_conv(qkv, halo, self.conv.to(qkv.dtype), sp.positions_T))
        q, k, v = qkv.view(B, T, 3, H, K).unbind(2)
        q = F.normalize(q.float(), dim=-1).to(q.dtype) / math.sqrt(K)
        k = F.normalize(k.float(), dim=-1).to(k.dtype)
        beta, g = self.gates(x_BTD)
        if self.method == "lasp2":
            o = lasp2_delta_rule_attention_in_context(q, k, v, beta.to(q.dtype), sp, log_decay=g.to(q.dtype))
        elif self.method == "ulysses":
            o = ulysses_delta_rule_attention_in_context(q, k, v, beta.to(q.dtype), sp, log_decay=g.to(q.dtype))
        else:  # scan, or lasp1: the same chain with one piece (a ring)
            pieces = 1 if self.method == "lasp1" else 4
            o = scan_delta_rule_attention_in_context(
                q, k, v, beta.to(q.dtype), sp, log_decay=g.to(q.dtype), pieces=pieces
            )
        o32 = o.float()
        o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_weight.float()
        gate = F.silu(self.gate_proj(x_BTD)).view(B, T, H, K)
        return self.out((o32.to(x_BTD.dtype) * gate).reshape(B, T, D))
