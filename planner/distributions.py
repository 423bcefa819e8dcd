"""Sequence-length distributions for planner demos and benchmarks.

Synthetic, heavy-tailed distributions matched to published corpus statistics, plus one real
distribution measured on this machine. All sampling is deterministic in the seed
(``numpy.random.Generator(PCG64(seed))``) and the first k lengths of a sample of n > k are the
sample of k, so step i of a run never depends on how many steps were drawn.

Synthetic model: a log-normal body (median e^mu, log-spread sigma) spliced at ``splice`` tokens
to a Pareto tail of index ``alpha``. The CDF is the log-normal's below the splice point and
``q + (1 - q)(1 - (splice/x)^alpha)`` above it, where q is the log-normal's mass below the
splice, so the density is continuous in mass and the tail can be heavier than a log-normal's.
A cap conditions on ``length <= cap`` (longer draws are redrawn), like FlexSP, which drops
sequences over the maximum length instead of truncating them into a spike at the cap.

Parameters and what they were fitted to (research/flexsp.md section 4; the shares of tokens
are the model's, at the default 192K cap unless stated; tests/test_distributions.py checks them
on samples of 10^6):

- ``wikipedia``: mu=5.81, sigma=1.49, splice=16,000, alpha=1.96. Least-squares fit in log space to
  FlexSP's Wikipedia sample (median 347, p90 2,112, p99 10,919, p99.9 37,353, mean 1,014; p75,
  p95, p99.99 with lower weight). The plain log-normal fit (mu=5.95, sigma=1.26) gives p99.9 of
  18.8K against 37.4K observed; this fit is within 7% at every one of those quantiles.
- ``commoncrawl``: mu=6.0, sigma=1.4, splice=6,000, alpha=1.5. Mean ~1.15K tokens (Pile-CC's
  4.33 KiB per document at ~4 bytes/token is ~1.1K) and 10.6% of tokens in sequences over 32K
  against Wikipedia's 6.2%: FlexSP reports that CommonCrawl carries more long-sequence tokens.
- ``github``: mu=6.3, sigma=1.5, splice=8,000, alpha=1.27. Chosen so that 16.2% of tokens come
  from sequences over 128K when capped at 2M (ByteScale's figure for GitHub, whose contexts reach
  2M); at the 192K cap it is the heaviest of the three (19.5% of tokens over 32K).

Real distribution ``python-stdlib``: the byte length (= token count under a byte-level
tokenizer) of every ``.py`` file of this interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, without site-packages/dist-packages, empty files
skipped), walked in sorted path order without following symlinks. It exists wherever Python
does; its exact numbers depend on the Python version and on whether the distribution ships
the ``test`` package. ``/usr/share/doc`` was not used: minimal container images strip it and
much of what remains is licence boilerplate. Sampling draws uniformly with replacement.
"""

from __future__ import annotations

import math
import os
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from statistics import NormalDist

import numpy as np

# 192K tokens: FlexSP's shorter maximum length (longer sequences are dropped).
DEFAULT_CAP = 192 * 1024
REAL_DISTRIBUTION = "python-stdlib"
# Draws happen in blocks of this size whatever ``num`` is: that keeps a sample of k a prefix of
# a sample of n > k with the same seed.
_BLOCK = 4096


@dataclass(frozen=True)
class SplicedLogNormalPareto:
    """Log-normal body below ``splice`` tokens, Pareto(alpha) tail above it."""

    mu: float
    sigma: float
    splice: float
    alpha: float

    @property
    def body_mass(self) -> float:
        """Probability of a length below the splice point (the log-normal's CDF there)."""
        return NormalDist(self.mu, self.sigma).cdf(math.log(self.splice))

    def quantile(self, q: float) -> float:
        """Exact quantile of the uncapped distribution."""
        if q < self.body_mass:
            return math.exp(NormalDist(self.mu, self.sigma).inv_cdf(q))
        return self.splice * ((1.0 - self.body_mass) / (1.0 - q)) ** (1.0 / self.alpha)

    def draw(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """``size`` real-valued lengths from the uncapped distribution."""
        lengths = np.exp(self.mu + self.sigma * rng.standard_normal(size))
        # A log-normal draw past the splice point happens with exactly the tail's mass: replacing
        # it with a Pareto draw above the splice point gives the spliced CDF without an inverse
        # normal CDF (numpy has none).
        tail_draws = self.splice * (1.0 - rng.random(size)) ** (-1.0 / self.alpha)
        return np.where(lengths < self.splice, lengths, tail_draws)


SYNTHETIC: dict[str, SplicedLogNormalPareto] = {
    "wikipedia": SplicedLogNormalPareto(mu=5.81, sigma=1.49, splice=16_000, alpha=1.96),
    "commoncrawl": SplicedLogNormalPareto(mu=6.0, sigma=1.4, splice=6_000, alpha=1.5),
    "github": SplicedLogNormalPareto(mu=6.3, sigma=1.5, splice=8_000, alpha=1.27),
}

# FlexSP's Wikipedia sample (research/flexsp.md section 4), the target of the fit above.
WIKIPEDIA_TARGETS = {"median": 347, "p90": 2_112, "p99": 10_919, "p99_9": 37_353, "mean": 1_014}


def distribution_names() -> list[str]:
    """Names accepted by :func:`sample_lengths`: the synthetic ones, then the real one."""
    return [*SYNTHETIC, REAL_DISTRIBUTION]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def python_stdlib_lengths() -> tuple[int, ...]:
    """Byte lengths of the standard library's ``.py`` files, in sorted path order."""
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library is not at {root}")
    lengths = []
    for dirpath, dirnames, filenames in os.walk(root):
        # sorting in place makes os.walk's traversal order deterministic
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            if name.endswith(".py") and not os.path.islink(path):
                size = os.path.getsize(path)
                if size > 0:
                    lengths.append(size)
    if not lengths:
        raise FileNotFoundError(f"no .py files under {root}")
    return tuple(lengths)


def sample_lengths(name: str, num: int, *, seed: int = 0, cap: int | None = DEFAULT_CAP) -> list[int]:
    """``num`` sequence lengths (tokens, integers >= 1) from distribution ``name``.

    ``cap``: the maximum length; longer draws are redrawn (the distribution conditioned on
    ``length <= cap``). ``None`` leaves it uncapped.
    """
    if name not in distribution_names():
        raise ValueError(f"unknown distribution {name!r}; choose one of {', '.join(distribution_names())}")
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    if cap is not None and cap < 1:
        raise ValueError(f"cap must be >= 1 token, got {cap}")
    rng = np.random.Generator(np.random.PCG64(seed))
    if name == REAL_DISTRIBUTION:
        pool = np.asarray(python_stdlib_lengths(), dtype=np.int64)
        if cap is not None:
            pool = pool[pool <= cap]
        if pool.size == 0:
            raise ValueError(f"no file of the {name} corpus is <= cap={cap} tokens")

        def draw(size: int) -> np.ndarray:
            return pool[rng.integers(0, pool.size, size)]

    else:
        model = SYNTHETIC[name]

        def draw(size: int) -> np.ndarray:
            # ceil keeps every length >= 1, and a draw <= cap stays <= cap after rounding
            return np.ceil(model.draw(rng, size)).astype(np.int64)

    return _draw_capped(draw, num, cap)


def _draw_capped(draw: Callable[[int], np.ndarray], num: int, cap: int | None) -> list[int]:
    kept: list[np.ndarray] = []
    count = 0
    while count < num:
        block = draw(_BLOCK)
        if cap is not None:
            block = block[block <= cap]
        kept.append(block)
        count += block.size
    return np.concatenate(kept)[:num].tolist() if kept else []


def length_stats(lengths) -> dict:
    """Summary of a list of lengths: count, tokens, mean, median, p90, p99, p99.9, max, and the
    share of tokens in sequences longer than 32K (where attention dominates GPT-7B's cost)."""
    arr = np.asarray(lengths, dtype=np.int64)
    if arr.size == 0:
        raise ValueError("length_stats needs at least one length")
    median, p90, p99, p99_9 = np.percentile(arr, [50, 90, 99, 99.9])
    tokens = int(arr.sum())
    return {
        "count": int(arr.size),
        "tokens": tokens,
        "mean": float(arr.mean()),
        "median": float(median),
        "p90": float(p90),
        "p99": float(p99),
        "p99_9": float(p99_9),
        "max": int(arr.max()),
        "token_share_over_32k": float(arr[arr > 32 * 1024].sum() / tokens),
    }
