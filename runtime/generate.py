"""Sampling text from a trained model in one process, on CPU or GPU.

    seqmoe generate --checkpoint runs/tiny-cpu --prompt "def main(" --max-new-tokens 64
    seqmoe generate --export exported/ --prompt "The " --temperature 0.8 --top-k 40 --device cuda

The model runs at SP = 1 with a single-rank context (no process group: every SP op of a group
of one is the plain single-device op) and, after export or in-memory consolidation, with all
experts local (ep_size 1). Each new token re-runs the whole sequence: no KV cache or recurrent
state to keep consistent with training, and the logits are exactly the training forward's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from runtime.model import HybridLM, SPContext

__all__ = ["GenerateError", "next_token_logits", "resolve_device", "sample"]


class GenerateError(ValueError):
    """Bad sampling options (an empty prompt, a negative temperature, an unavailable device)."""


def resolve_device(spec: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.split(":")[0] not in ("cpu", "cuda"):
        raise GenerateError(f"--device {spec!r}: use auto, cpu, cuda or cuda:N")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise GenerateError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return torch.device(spec)


@torch.no_grad()
def next_token_logits(model: HybridLM, tokens_T: Tensor) -> Tensor:
    """[T, vocab] float32 logits of one sequence, through the training forward (one document)."""
    T = int(tokens_T.numel())
    # under no_grad the balance tracker only observes metrics: its GA buffer stays untouched
    logits_1TV = model(tokens_T[None], SPContext.single(T, device=tokens_T.device)).logits
    if model.routing_metrics is not None:
        model.routing_metrics.reset()
    return logits_1TV[0].float()


@torch.no_grad()
def sample(
    model: HybridLM,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> list[int]:
    """``max_new_tokens`` token ids after ``prompt_ids``. ``temperature`` 0 = greedy; ``top_k`` 0 =
    the whole vocabulary. Draws come from a CPU generator seeded with ``seed``, so a seed gives the
    same text on CPU and GPU up to the logits' rounding."""
    if not prompt_ids:
        raise GenerateError("the prompt encodes to no tokens; give --prompt at least one character")
    if max_new_tokens < 0:
        raise GenerateError(f"--max-new-tokens {max_new_tokens}: must be >= 0")
    if temperature < 0:
        raise GenerateError(f"--temperature {temperature}: must be >= 0 (0 = greedy)")
    if top_k < 0:
        raise GenerateError(f"--top-k {top_k}: must be >= 0 (0 = no limit)")
    vocab = model.config.vocab_size
    if max(prompt_ids) >= vocab:
        raise GenerateError(f"the prompt has token id {max(prompt_ids)} >= the model's vocab_size {vocab}")
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    tokens_T = torch.tensor(list(prompt_ids), dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        logits_V = next_token_logits(model, tokens_T)[-1].cpu()
        if temperature == 0:
            choice = int(logits_V.argmax())
        else:
            logits_V = logits_V / temperature
            if 0 < top_k < vocab:
                threshold = torch.topk(logits_V, top_k).values[-1]
                logits_V = logits_V.masked_fill(logits_V < threshold, float("-inf"))
            choice = int(torch.multinomial(torch.softmax(logits_V, dim=-1), 1, generator=generator))
        tokens_T = torch.cat([tokens_T, torch.tensor([choice], device=device)])
    return tokens_T[len(prompt_ids) :].tolist()
