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
1..m) and is reset by ``begin_step()``, which the runtime's ``train_step`` calls as each step begins.

Device discipline (DESIGN.md invariant 7): every count, buffer and loss lives on the routing
tensors' device, counts are made with ``index_add_`` (CUDA's ``bincount`` reads its maximum
back to the host), padding is a 0/1 weight instead of a boolean index (no ``nonzero`` sync),
and nothing here reads a value back to the host.

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
    "BalanceLoss",
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


def expert_counts(experts_TK: Tensor, num_experts: int, weight_T: Tensor | None = None) -> Tensor:
    """[E] float64 number of (token, choice) pairs per expert (tokens of weight 0 left out).
    float64 so that sums over a whole global batch (millions of tokens) stay exact integers."""
    flat = experts_TK.reshape(-1)
    if weight_T is None:
        ones = torch.ones(flat.shape, dtype=torch.float64, device=flat.device)
    else:
        ones = weight_T.to(torch.float64).repeat_interleave(experts_TK.shape[1])
    return torch.zeros(num_experts, dtype=torch.float64, device=flat.device).index_add_(0, flat, ones)


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
    tokens = torch.full((1,), probs_TE.shape[0], dtype=torch.float64, device=probs_TE.device)
    stats = torch.cat([expert_counts(topk_indices_TK, num_experts), tokens])
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


def _sequence_stats(
    experts_TK: Tensor, seq_T: Tensor, num_sequences: int, num_experts: int, weight_T: Tensor | None = None
) -> Tensor:
    """[S, E+1] float64: per sequence, the expert counts and the token count (weight-0 tokens left out)."""
    flat = (seq_T[:, None] * (num_experts + 1) + experts_TK).reshape(-1)
    w_T = torch.ones(seq_T.shape, dtype=torch.float64, device=seq_T.device) if weight_T is None else weight_T.double()
    stats = torch.zeros(num_sequences * (num_experts + 1), dtype=torch.float64, device=experts_TK.device)
    stats.index_add_(0, flat, w_T.repeat_interleave(experts_TK.shape[1]))
    stats.index_add_(0, seq_T * (num_experts + 1) + num_experts, w_T)
    return stats.view(num_sequences, num_experts + 1)


def _sequence_lbl_sum(stats_SE1: Tensor, psum_SE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(Σ over sequences of each sequence's LBL, the number of non-empty sequences)."""
    counts_SE, tokens_S = stats_SE1[:, :-1], stats_SE1[:, -1]
    f_SE = counts_SE / (tokens_S.clamp(min=1)[:, None] * k)
    per_seq_S = (
        psum_SE.shape[1] * (f_SE.to(psum_SE.dtype) * psum_SE).sum(dim=1) / tokens_S.clamp(min=1).to(psum_SE.dtype)
    )
    return per_seq_S.sum(), (tokens_S > 0).sum().to(torch.float64)


def _divide(total: Tensor, normalizer: Tensor | float) -> Tensor:
    if isinstance(normalizer, Tensor):
        return total / normalizer.clamp(min=1).to(total.dtype)
    return total / max(float(normalizer), 1.0)


def _sequence_lbl(stats_SE1: Tensor, psum_SE: Tensor, k: int, normalizer: Tensor | float | None) -> Tensor:
    total, nonempty = _sequence_lbl_sum(stats_SE1, psum_SE, k)
    return _divide(total, nonempty if normalizer is None else normalizer)


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
    return _sequence_lbl(stats, psum_SE, topk_indices_TK.shape[1], normalizer)


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
    """Divide the summed per-sequence losses by this (default: this micro-batch's non-empty
    sequences). The runtime leaves it unset and passes the global batch's sequence count to
    ``BalanceLoss.share`` instead."""


@dataclass(frozen=True)
class BalanceLoss:
    """The balance (+ z) loss of one forward, as a value: sums that wait for their normalisers.

    ``value()`` divides by this micro-batch's own counts (a standalone layer). The runtime calls
    ``share(tokens=, sequences=)`` with the global batch's token and sequence counts, which makes
    the shares of all ranks and micro-batches sum to the loss of the global batch, whatever the
    plan (invariant 2). All four tensors live on the routing device."""

    per_token: Tensor
    """coef · Σ_sites LBL numerators (global, micro) + z_loss_coef · Σ_sites Σ_tokens lse²."""
    per_sequence: Tensor
    """coef · Σ_sites Σ_sequences LBL of each sequence (balance = 'sequence')."""
    tokens: Tensor
    """Default token normaliser: the micro-batch's tokens (over the balance group for 'global')."""
    sequences: Tensor
    """Default sequence normaliser: the micro-batch's non-empty sequences."""

    @staticmethod
    def zero(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> BalanceLoss:
        z = torch.zeros((), dtype=dtype, device=device)
        return BalanceLoss(z, z, z.double(), z.double())

    def share(self, *, tokens: float | Tensor | None = None, sequences: float | Tensor | None = None) -> Tensor:
        tokens = self.tokens if tokens is None else tokens
        sequences = self.sequences if sequences is None else sequences
        return _divide(self.per_token, tokens) + _divide(self.per_sequence, sequences)

    def value(self) -> Tensor:
        return self.share()


@dataclass
class _SiteRecord:
    experts_TK: Tensor
    psum_E: Tensor
    lse2_sum: Tensor
    probs_TE: Tensor
    weight_T: Tensor | None
    """0 on padding tokens (None: no padding)."""
    tokens: Tensor
    """float64 scalar: the real tokens of this site."""


def inside_backward() -> bool:
    """True while autograd runs a backward pass (activation recompute happens there)."""
    return torch._C._current_graph_task_id() != -1


class BalanceTracker:
    """Collects every MoE routing decision ("site": a layer, or one Chain-of-Experts iteration
    of a layer) of a forward pass and turns them into one balance loss.

    Per micro-batch: ``begin_microbatch()``, forward (each site calls ``record``), ``result()``
    (a ``BalanceLoss``) or ``loss()`` (its tensor). Before a step's first micro-batch: ``begin_step()``.

    - ``global``: the counts of all sites travel in **one** flattened all-reduce of
      sites×(E+1) float64 numbers, launched asynchronously as soon as the last site has routed,
      so it overlaps the last layer's expert compute and the LM head; ``result()`` waits for it.
    - Activation recompute re-runs routing inside the backward pass; a site that is recorded
      again there is ignored, so counts, buffers and collectives are not doubled.
    - Under ``torch.no_grad()`` (evaluation) only metrics are observed: no loss statistics,
      no collective, no change to the GA buffer.
    - The GA buffer follows the routing tensors' device (it starts on the CPU and moves on the
      first record), so the tracker works unchanged on CPU, CUDA and ``meta``.

    ``token_normalizer`` (for ``loss()``) turns the per-rank losses into per-token shares that
    sum exactly over ranks and micro-batches; without it, each micro-batch is normalised by its
    own tokens (its local tokens for ``micro``).
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
        self._result: BalanceLoss | None = None
        self.token_normalizer: float | None = None
        self.sequence: SequenceLayout | None = None
        self.domains_T: Tensor | None = None
        self.weight_T: Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.buffer_counts_SE.device

    def to(self, device: torch.device | str) -> BalanceTracker:
        """Move the GA buffer (done by ``record`` for the routing's device)."""
        self.buffer_counts_SE = self.buffer_counts_SE.to(device)
        self.buffer_tokens_S = self.buffer_tokens_S.to(device)
        return self

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
        (False on padding tokens; pass None when there is none) leaves padding out of every
        count, loss and metric, as a 0/1 weight."""
        if self._sync is not None and self._sync[1] is not None:
            self._sync[1].wait()  # a forward whose loss was never taken: finish its collective
        self._sites, self._sync, self._result = {}, None, None
        self.token_normalizer, self.sequence, self.domains_T = token_normalizer, sequence, domains_T
        self.weight_T = None if valid_T is None else valid_T.to(torch.float64)

    def record(self, site: int, routing: Routing) -> None:
        if not 0 <= site < self.num_sites:
            raise ValueError(f"BalanceTracker.record: site {site} outside [0, {self.num_sites})")
        w_T = self.weight_T
        if not torch.is_grad_enabled():
            if self.metrics is not None:
                self.metrics.observe(site, routing, self.domains_T, w_T)
            return
        # computed in the recompute pass as well: activation checkpointing requires the
        # recomputation to save exactly the tensors the forward saved
        probs = routing.probs_TE
        if w_T is not None:
            probs = probs * w_T.to(probs.dtype)[:, None]
        if self.z_loss_coef:
            lse2_T = torch.logsumexp(routing.logits_TE, dim=-1).pow(2)
            lse2 = (lse2_T if w_T is None else lse2_T * w_T.to(lse2_T.dtype)).sum()
        else:
            lse2 = probs.new_zeros(())
        psum_E = probs.sum(dim=0)
        if site in self._sites:
            if inside_backward():
                return  # activation recompute: this routing was counted in the forward pass
            raise RuntimeError(
                f"MoE site {site} routed twice in one micro-batch: call begin_microbatch() before each forward"
            )
        if self.buffer_counts_SE.device != probs.device:
            self.to(probs.device)
        if self.metrics is not None:
            self.metrics.observe(site, routing, self.domains_T, w_T)
        n = len(routing.experts_TK)
        tokens = w_T.sum() if w_T is not None else torch.full((), n, dtype=torch.float64, device=probs.device)
        self._sites[site] = _SiteRecord(routing.experts_TK.detach(), psum_E, lse2, probs, w_T, tokens)
        if self.balance == "global" and len(self._sites) == self.num_sites:
            self._start_sync()

    def _start_sync(self) -> None:
        """One all-reduce of every site's [counts, tokens] over the balance group."""
        rows = [
            torch.cat([expert_counts(r.experts_TK, self.num_experts, r.weight_T), r.tokens.reshape(1)])
            for _, r in sorted(self._sites.items())
        ]
        stats = torch.stack(rows)
        if self.group is None or group_size(self.group) == 1:
            self._sync = (stats, None)
            return
        self._sync = dist_all_reduce(stats, group=self.group, async_op=True)

    # ----------------------------------------------------------------------------------------
    def result(self) -> BalanceLoss:
        """The balance (+ z) loss of this micro-batch as a value (see ``BalanceLoss``).
        Computed once per micro-batch (repeated calls return the same value)."""
        if self._result is not None:
            return self._result
        if not self._sites:
            self._result = BalanceLoss.zero(self.device)
            return self._result
        first = next(iter(self._sites.values()))
        zero = first.psum_E.new_zeros(())
        sequences = zero.double()
        if self.balance == "global":
            lbl, tokens = self._global_lbl_sum()
            per_sequence = zero
        elif self.balance == "micro":
            lbl, tokens, per_sequence = self._micro_lbl_sum(first.tokens), first.tokens, zero
        else:
            lbl, tokens = zero, first.tokens
            per_sequence, sequences = self._sequence_lbl_sum()
            per_sequence = self.coef * per_sequence
        per_token = self.coef * lbl
        if self.z_loss_coef:
            per_token = per_token + self.z_loss_coef * sum(r.lse2_sum for r in self._sites.values())
        self._result = BalanceLoss(per_token, per_sequence, tokens, sequences)
        return self._result

    def loss(self) -> Tensor:
        """``result()``'s tensor, divided by ``token_normalizer`` and the sequence layout's
        normaliser when given, else by this micro-batch's own counts."""
        sequences = None if self.sequence is None else self.sequence.normalizer
        return self.result().share(tokens=self.token_normalizer, sequences=sequences)

    def _global_lbl_sum(self) -> tuple[Tensor, Tensor]:
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
        one = torch.ones((), dtype=torch.float64, device=tokens.device)
        lbl = sum(
            _lbl(self.buffer_counts_SE[s], self.buffer_tokens_S[s], self.top_k, self._sites[s].psum_E, one)
            for s in sites
        )
        return lbl, tokens

    def _micro_lbl_sum(self, local_tokens: Tensor) -> Tensor:
        one = torch.ones((), dtype=torch.float64, device=local_tokens.device)
        lbl = 0.0
        for r in self._sites.values():
            counts_E = expert_counts(r.experts_TK, self.num_experts, r.weight_T)
            # this rank's LBL numerator; divided by the normaliser's tokens in BalanceLoss.share
            lbl = lbl + _lbl(counts_E, local_tokens, self.top_k, r.psum_E, one)
        return lbl

    def _sequence_lbl_sum(self) -> tuple[Tensor, Tensor]:
        layout = self.sequence
        if layout is None:
            raise RuntimeError("balance='sequence' needs begin_microbatch(sequence=SequenceLayout(...))")
        sites = sorted(self._sites)
        stats = torch.stack(
            [
                _sequence_stats(
                    self._sites[s].experts_TK,
                    layout.seq_ids_T,
                    layout.num_sequences,
                    self.num_experts,
                    self._sites[s].weight_T,
                )
                for s in sites
            ]
        )
        if layout.group is not None:
            dist_all_reduce(stats, group=layout.group)  # one collective for all sites
        total, nonempty = 0.0, None
        for i, s in enumerate(sites):
            probs = self._sites[s].probs_TE  # already weighted: padding contributes nothing
            psum_SE = probs.new_zeros(layout.num_sequences, self.num_experts).index_add(0, layout.seq_ids_T, probs)
            site_sum, nonempty = _sequence_lbl_sum(stats[i], psum_SE, self.top_k)
            total = total + site_sum
        return total, nonempty

    def begin_step(self) -> None:
        """Before a step's first micro-batch: an empty gradient-accumulation buffer."""
        self.buffer_counts_SE.zero_()
        self.buffer_tokens_S.zero_()
