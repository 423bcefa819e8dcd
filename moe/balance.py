"""Load-balancing losses: micro-batch, sequence-level and global-batch (Qiu et al. 2025), z-loss.

One normalisation everywhere: LBL = E · Σᵢ fᵢ·Pᵢ with fᵢ = (tokens choosing expert i)/(tokens·k)
and Pᵢ = the mean full-softmax probability of expert i. A perfectly balanced batch scores 1.0,
a batch that sends everything to k experts scores E/k.

How coefficients compare across codebases:
- Megatron-core (``switch_load_balancing_loss_func``) and DeepSpeed (``TopKGate``, general k)
  use the same normalisation (balanced = 1.0), so their coefficients carry over unchanged
  (Megatron recommends starting at 1e-2). DeepSpeed's top-2 path counts f from the first choice
  only; we count all k choices.
- The Hugging Face convention (Mixtral / Qwen-MoE ``load_balancing_loss_func``, also RMoE's code)
  divides f by the token count only, so a balanced batch scores k: an HF coefficient c equals
  ours at c·k.

The three variants differ only in the set of tokens f is counted over:
- ``micro``: this rank's tokens (what DeepSpeed-MoE, Tutel and Megatron's aux_loss do).
- ``sequence``: each sequence on its own (DeepSeek-V2/V3 style), averaged over sequences; under
  sequence parallelism the counts of a sequence are summed over its SP group first, so a
  sequence's loss covers the whole sequence and not the shard.
- ``global``: the counts are summed over every rank that holds different tokens (under
  per-step SP groups that is all ranks). Each rank returns its *share*
  E·Σᵢ f̄ᵢ·(Σ_local pᵢ)/T_global; the shares sum over ranks to the global-batch LBL, in value
  and in gradient, because f̄ carries no gradient. The runtime sums gradients over ranks, so
  nothing needs rescaling (Megatron's global_aux_loss averages and ends up 1/DP too small).

Gradient accumulation follows the paper's Algorithm 1: a per-site buffer of synchronised counts
grows over the micro-batches of one optimizer step (micro-batch m sees the counts of micro-batches
1..m) and is reset by ``end_step()``.

Shapes: T tokens, E experts, K experts per token, S sequences (or sites, in the tracker).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe.metrics import RoutingMetrics
from moe.router import Routing, at_least_fp32
from parallel.comm import Group, dist_all_reduce, group_size

__all__ = [
    "BALANCE_MODES",
    "BalanceTracker",
    "SequenceLayout",
    "expert_counts",
    "inside_backward",
    "load_balancing_loss",
    "sequence_ids",
    "sequence_load_balancing_loss",
    "z_loss",
]

BALANCE_MODES = ("micro", "sequence", "global")


def expert_counts(experts_TK: Tensor, num_experts: int) -> Tensor:
    """[E] float64 number of (token, choice) pairs per expert. float64 so that sums over a whole
    global batch (millions of tokens) stay exact integers."""
    return torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(torch.float64)


def _lbl(counts_E: Tensor, tokens: Tensor, k: int, psum_E: Tensor, normalizer: Tensor) -> Tensor:
    """E · Σᵢ fᵢ · (Σ pᵢ) / normalizer, with fᵢ = countsᵢ/(tokens·k); 0 for an empty batch."""
    f_E = counts_E / (tokens.clamp(min=1) * k)
    return counts_E.numel() * (f_E.to(psum_E.dtype) * psum_E).sum() / normalizer.clamp(min=1).to(psum_E.dtype)


def load_balancing_loss(
    probs_TE: Tensor, topk_indices_TK: Tensor, *, num_experts: int, group: Group | None = None
) -> Tensor:
    """The switch-style LBL, 1.0 when balanced.

    ``group=None``: this rank's tokens only (micro-batch LBL). With a group, counts and token
    totals are summed over the group (one all-reduce of E+1 numbers) and the result is this
    rank's share E·Σᵢ f̄ᵢ·(Σ_local pᵢ)/T_global; the shares sum to the global-batch LBL in value
    and gradient. A rank with no tokens still joins the all-reduce and returns a zero share."""
    if probs_TE.shape[-1] != num_experts:
        raise ValueError(f"load_balancing_loss: probs have {probs_TE.shape[-1]} experts, num_experts={num_experts}")
    stats = torch.cat([expert_counts(topk_indices_TK, num_experts), probs_TE.new_tensor([probs_TE.shape[0]]).double()])
    if group is not None:
        dist_all_reduce(stats, group=group)
    counts_E, tokens = stats[:num_experts], stats[num_experts]
    return _lbl(counts_E, tokens, topk_indices_TK.shape[1], probs_TE.sum(dim=0), tokens)


def sequence_ids(cu_seqlens: Tensor | None, offset: int, num_tokens: int, device=None) -> Tensor:
    """[T] index of the packed sequence each local token belongs to (0 when there is one)."""
    if cu_seqlens is None:
        return torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.arange(offset, offset + num_tokens, device=cu_seqlens.device)
    return (torch.bucketize(positions, cu_seqlens[1:], right=True)).to(device or cu_seqlens.device)


def _sequence_stats(experts_TK: Tensor, seq_T: Tensor, num_sequences: int, num_experts: int) -> Tensor:
    """[S, E+1] float64: per sequence, the expert counts and the token count."""
    flat = (seq_T[:, None] * (num_experts + 1) + experts_TK).reshape(-1)
    stats = torch.zeros(num_sequences * (num_experts + 1), dtype=torch.float64, device=experts_TK.device)
    stats.index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    stats.index_add_(0, seq_T * (num_experts + 1) + num_experts, torch.full_like(seq_T, 1, dtype=torch.float64))
    return stats.view(num_sequences, num_experts + 1)


def _sequence_lbl(stats_SE1: Tensor, psum_SE: Tensor, k: int, normalizer: Tensor | None) -> Tensor:
    counts_SE, tokens_S = stats_SE1[:, :-1], stats_SE1[:, -1]
    f_SE = counts_SE / (tokens_S.clamp(min=1)[:, None] * k)
    per_seq_S = (
        psum_SE.shape[1] * (f_SE.to(psum_SE.dtype) * psum_SE).sum(dim=1) / tokens_S.clamp(min=1).to(psum_SE.dtype)
    )
    if normalizer is None:
        normalizer = (tokens_S > 0).sum()
    return per_seq_S.sum() / normalizer.clamp(min=1).to(psum_SE.dtype)


def sequence_load_balancing_loss(
    probs_TE: Tensor,
    topk_indices_TK: Tensor,
    *,
    num_experts: int,
    seq_ids_T: Tensor,
    num_sequences: int,
    group: Group | None = None,
    normalizer: float | None = None,
) -> Tensor:
    """Mean over sequences of each sequence's LBL (1.0 when every sequence is balanced).

    ``seq_ids_T`` gives each local token's sequence in [0, num_sequences). With an SP ``group``
    whose ranks hold shards of the same packed sequences, per-sequence counts are summed over
    it, and this rank returns its share of each sequence's loss. ``normalizer`` (default: the
    number of non-empty sequences) is what the per-sequence losses are divided by."""
    stats = _sequence_stats(topk_indices_TK, seq_ids_T, num_sequences, num_experts)
    if group is not None:
        dist_all_reduce(stats, group=group)
    psum_SE = probs_TE.new_zeros(num_sequences, num_experts).index_add(0, seq_ids_T, probs_TE)
    norm = None if normalizer is None else torch.tensor(float(normalizer), dtype=torch.float64)
    return _sequence_lbl(stats, psum_SE, topk_indices_TK.shape[1], norm)


def z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)²; keeps logits small."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(at_least_fp32(logits_TE), dim=-1).pow(2).mean()


@dataclass(frozen=True)
class SequenceLayout:
    """Which packed sequence each local token belongs to, for the sequence-level loss."""

    seq_ids_T: Tensor
    num_sequences: int
    group: Group | None = None
    """The SP group whose ranks hold shards of these same sequences (None: whole sequences)."""
    normalizer: float | None = None
    """Divide the summed per-sequence losses by this (the global batch's sequence count in the
    runtime; default: this micro-batch's non-empty sequences)."""


@dataclass
class _SiteRecord:
    experts_TK: Tensor
    psum_E: Tensor
    lse2_sum: Tensor
    probs_TE: Tensor


def inside_backward() -> bool:
    """True while autograd runs a backward pass (activation recompute happens there)."""
    return torch._C._current_graph_task_id() != -1


class BalanceTracker:
    """Collects every MoE routing decision ("site": a layer, or one Chain-of-Experts iteration
    of a layer) of a forward pass and turns them into one balance loss.

    Per micro-batch: ``begin_microbatch()``, forward (each site calls ``record``), ``loss()``.
    After the optimizer step: ``end_step()``.

    - ``global``: the counts of all sites travel in **one** flattened all-reduce of
      sites×(E+1) float64 numbers, launched asynchronously as soon as the last site has routed,
      so it overlaps the last layer's expert compute and the LM head; ``loss()`` waits for it.
    - Activation recompute re-runs routing inside the backward pass; a site that is recorded
      again there is ignored, so counts, buffers and collectives are not doubled.
    - Under ``torch.no_grad()`` (evaluation) only metrics are observed: no loss statistics,
      no collective, no change to the GA buffer.

    ``token_normalizer`` (the runtime passes the global batch's token count) turns the per-rank
    losses into per-token shares that sum exactly over ranks and micro-batches; without it, each
    micro-batch is normalised by its own tokens (its local tokens for ``micro``).
    """

    def __init__(
        self,
        *,
        num_experts: int,
        top_k: int,
        num_sites: int,
        balance: str = "global",
        coef: float = 0.01,
        z_loss_coef: float = 0.0,
        group: Group | None = None,
        metrics: RoutingMetrics | None = None,
    ):
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance={balance!r}: allowed {', '.join(BALANCE_MODES)}")
        if coef < 0 or z_loss_coef < 0:
            raise ValueError(f"balance coefficients must be >= 0, got coef={coef}, z_loss_coef={z_loss_coef}")
        self.num_experts, self.top_k, self.num_sites = num_experts, top_k, num_sites
        self.balance, self.coef, self.z_loss_coef = balance, coef, z_loss_coef
        self.group = group
        self.metrics = metrics
        # the GA buffer: synchronised counts and tokens per site since the last optimizer step
        self.buffer_counts_SE = torch.zeros(num_sites, num_experts, dtype=torch.float64)
        self.buffer_tokens_S = torch.zeros(num_sites, dtype=torch.float64)
        self._sites: dict[int, _SiteRecord] = {}
        self._sync = None
        self._loss: Tensor | None = None
        self.token_normalizer: float | None = None
        self.sequence: SequenceLayout | None = None
        self.domains_T: Tensor | None = None
        self.valid_T: Tensor | None = None

    # ----------------------------------------------------------------------------------------
    def begin_microbatch(
        self,
        *,
        token_normalizer: float | None = None,
        sequence: SequenceLayout | None = None,
        domains_T: Tensor | None = None,
        valid_T: Tensor | None = None,
    ) -> None:
        """Start a micro-batch. ``domains_T`` (int labels per local token) feeds the per-domain
        expert-selection metric; ``sequence`` is required for balance='sequence'; ``valid_T``
        (False on padding tokens) leaves padding out of every count, loss and metric."""
        if self._sync is not None and self._sync[1] is not None:
            self._sync[1].wait()  # a forward whose loss was never taken: finish its collective
        self._sites, self._sync, self._loss = {}, None, None
        self.token_normalizer, self.sequence, self.domains_T = token_normalizer, sequence, domains_T
        self.valid_T = None if valid_T is None or bool(valid_T.all()) else valid_T
        if self.valid_T is not None:
            if self.domains_T is not None:
                self.domains_T = self.domains_T[self.valid_T]
            if sequence is not None:
                self.sequence = SequenceLayout(
                    sequence.seq_ids_T[self.valid_T], sequence.num_sequences, sequence.group, sequence.normalizer
                )

    def record(self, site: int, routing: Routing) -> None:
        if not 0 <= site < self.num_sites:
            raise ValueError(f"BalanceTracker.record: site {site} outside [0, {self.num_sites})")
        if self.valid_T is not None:
            v = self.valid_T
            routing = Routing(routing.logits_TE[v], routing.probs_TE[v], routing.experts_TK[v], routing.weights_TK[v])
        if not torch.is_grad_enabled():
            if self.metrics is not None:
                self.metrics.observe(site, routing, self.domains_T)
            return
        # computed in the recompute pass as well: activation checkpointing requires the
        # recomputation to save exactly the tensors the forward saved
        probs = routing.probs_TE
        lse2 = torch.logsumexp(routing.logits_TE, dim=-1).pow(2).sum() if self.z_loss_coef else probs.new_zeros(())
        psum_E = probs.sum(dim=0)
        if site in self._sites:
            if inside_backward():
                return  # activation recompute: this routing was counted in the forward pass
            raise RuntimeError(
                f"MoE site {site} routed twice in one micro-batch: call begin_microbatch() before each forward"
            )
        if self.metrics is not None:
            self.metrics.observe(site, routing, self.domains_T)
        self._sites[site] = _SiteRecord(routing.experts_TK.detach(), psum_E, lse2, probs)
        if self.balance == "global" and len(self._sites) == self.num_sites:
            self._start_sync()

    def _start_sync(self) -> None:
        """One all-reduce of every site's [counts, tokens] over the balance group."""
        rows = []
        for _, r in sorted(self._sites.items()):
            tokens = torch.tensor([len(r.experts_TK)], dtype=torch.float64)
            rows.append(torch.cat([expert_counts(r.experts_TK, self.num_experts), tokens]))
        stats = torch.stack(rows)
        if self.group is None or group_size(self.group) == 1:
            self._sync = (stats, None)
            return
        self._sync = dist_all_reduce(stats, group=self.group, async_op=True)

    # ----------------------------------------------------------------------------------------
    def loss(self) -> Tensor:
        """coef · Σ_sites LBL share + z_loss_coef · Σ_sites z-loss share, for this micro-batch.
        Computed once per micro-batch (repeated calls return the same tensor)."""
        if self._loss is not None:
            return self._loss
        if not self._sites:
            self._loss = torch.zeros(())
            return self._loss
        local_tokens = torch.tensor(float(len(next(iter(self._sites.values())).experts_TK)), dtype=torch.float64)
        if self.balance == "global":
            lbl, tokens = self._global_loss()
        elif self.balance == "micro":
            lbl, tokens = self._micro_loss(local_tokens), local_tokens
        else:
            lbl, tokens = self._sequence_loss(), local_tokens
        total = self.coef * lbl
        if self.z_loss_coef:
            norm = self._normalizer(tokens)
            total = total + self.z_loss_coef * sum(r.lse2_sum for r in self._sites.values()) / norm.float()
        self._loss = total
        return total

    def _normalizer(self, default: Tensor) -> Tensor:
        if self.token_normalizer is None:
            return default
        return torch.tensor(float(self.token_normalizer), dtype=torch.float64)

    def _global_loss(self) -> tuple[Tensor, Tensor]:
        if self._sync is None:
            self._start_sync()  # fewer sites than expected routed: sync what there is
        stats, handle = self._sync
        if handle is not None:
            handle.wait()
        self._sync = None
        sites = sorted(self._sites)
        self.buffer_counts_SE[sites] += stats[:, :-1]
        self.buffer_tokens_S[sites] += stats[:, -1]
        tokens = stats[0, -1]  # every site of a micro-batch sees the same tokens
        norm = self._normalizer(tokens)
        lbl = sum(
            _lbl(self.buffer_counts_SE[s], self.buffer_tokens_S[s], self.top_k, self._sites[s].psum_E, norm)
            for s in sites
        )
        return lbl, tokens

    def _micro_loss(self, local_tokens: Tensor) -> Tensor:
        norm = self._normalizer(local_tokens)
        lbl = 0.0
        for r in self._sites.values():
            counts_E = expert_counts(r.experts_TK, self.num_experts)
            # this rank's LBL weighted by its share of the normaliser's tokens
            lbl = lbl + _lbl(counts_E, local_tokens, self.top_k, r.psum_E, norm)
        return lbl

    def _sequence_loss(self) -> Tensor:
        layout = self.sequence
        if layout is None:
            raise RuntimeError("balance='sequence' needs begin_microbatch(sequence=SequenceLayout(...))")
        sites = sorted(self._sites)
        stats = torch.stack(
            [
                _sequence_stats(self._sites[s].experts_TK, layout.seq_ids_T, layout.num_sequences, self.num_experts)
                for s in sites
            ]
        )
        if layout.group is not None:
            dist_all_reduce(stats, group=layout.group)  # one collective for all sites
        norm = None if layout.normalizer is None else torch.tensor(float(layout.normalizer), dtype=torch.float64)
        lbl = 0.0
        for i, s in enumerate(sites):
            probs = self._sites[s].probs_TE
            psum_SE = probs.new_zeros(layout.num_sequences, self.num_experts).index_add(0, layout.seq_ids_T, probs)
            lbl = lbl + _sequence_lbl(stats[i], psum_SE, self.top_k, norm)
        return lbl

    def end_step(self) -> None:
        """After the optimizer step: reset the gradient-accumulation buffer."""
        self.buffer_counts_SE.zero_()
        self.buffer_tokens_S.zero_()
