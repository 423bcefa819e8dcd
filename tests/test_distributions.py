"""Length distributions: synthetic quantiles against their published targets, determinism,
caps, and the real corpus measured on this machine."""

from __future__ import annotations

import os

import numpy as np
import pytest

from planner import distributions as D

# 10^6 draws put ~1,000 samples above p99.9, so its sampling error is a few per cent.
NUM = 1_000_000


@pytest.fixture(scope="module")
def wikipedia():
    return D.sample_lengths("wikipedia", NUM, seed=0)


def test_names():
    assert D.distribution_names() == ["wikipedia", "commoncrawl", "github", "python-stdlib"]


@pytest.mark.parametrize("key", ["median", "p90", "p99", "p99_9", "mean"])
def test_wikipedia_matches_flexsp_sample(wikipedia, key):
    # tolerance 10%: the 4-parameter fit is within 7% of each target, the rest is sampling noise
    measured = D.length_stats(wikipedia)[key]
    target = D.WIKIPEDIA_TARGETS[key]
    assert abs(measured / target - 1) < 0.10, f"{key}: {measured:.0f} vs target {target}"


def test_wikipedia_tail_is_heavier_than_the_plain_lognormal_fit(wikipedia):
    plain = np.exp(5.95 + 1.26 * np.random.default_rng(0).standard_normal(NUM))
    assert np.percentile(plain, 99.9) < 20_000 < 30_000 < D.length_stats(wikipedia)["p99_9"]


@pytest.mark.parametrize("name", ["wikipedia", "commoncrawl", "github"])
def test_sampler_matches_the_analytic_quantiles(name):
    lengths = np.asarray(D.sample_lengths(name, NUM, seed=0, cap=None))
    model = D.SYNTHETIC[name]
    # tolerances are > 3 standard deviations of the sample quantile over seeds (0.7% at p99,
    # 2.5% at p99.9 for github's alpha=1.27 tail); ceil adds < 1 token
    for q, rel in ((0.5, 0.02), (0.9, 0.02), (0.99, 0.03), (0.999, 0.08)):
        assert np.percentile(lengths, 100 * q) == pytest.approx(model.quantile(q), rel=rel)


def test_commoncrawl_and_github_have_more_long_tokens_than_wikipedia(wikipedia):
    share = {
        name: D.length_stats(D.sample_lengths(name, NUM, seed=0))["token_share_over_32k"]
        for name in ("commoncrawl", "github")
    }
    assert D.length_stats(wikipedia)["token_share_over_32k"] < share["commoncrawl"] < share["github"]


def test_github_long_token_share_matches_bytescale():
    # ByteScale: 16.2% of GitHub tokens are in sequences over 128K (contexts up to 2M)
    lengths = np.asarray(D.sample_lengths("github", NUM, seed=0, cap=2**21))
    share = lengths[lengths > 128 * 1024].sum() / lengths.sum()
    assert share == pytest.approx(0.162, abs=0.03)


def test_commoncrawl_mean_matches_pile_cc():
    # Pile-CC: 4.33 KiB per document, ~1.1K tokens at ~4 bytes per token
    assert D.length_stats(D.sample_lengths("commoncrawl", NUM, seed=0))["mean"] == pytest.approx(1100, rel=0.10)


@pytest.mark.parametrize("name", D.distribution_names())
def test_deterministic_capped_positive_integers(name):
    first = D.sample_lengths(name, 5000, seed=7, cap=50_000)
    assert first == D.sample_lengths(name, 5000, seed=7, cap=50_000)
    assert first != D.sample_lengths(name, 5000, seed=8, cap=50_000)
    # a shorter sample is a prefix of a longer one: step i does not depend on the run's length
    assert first[:123] == D.sample_lengths(name, 123, seed=7, cap=50_000)
    assert all(isinstance(x, int) and 1 <= x <= 50_000 for x in first)


def test_default_cap_is_192k():
    assert max(D.sample_lengths("github", 100_000, seed=0)) <= 192 * 1024 == D.DEFAULT_CAP


def test_python_stdlib_is_measured_from_the_files():
    root = D.stdlib_root()
    assert root.is_dir()
    lengths = D.python_stdlib_lengths()
    assert len(lengths) > 100 and min(lengths) > 0
    # spot check: the first file in sorted order is really that long
    top_level = sorted(p for p in os.listdir(root) if p.endswith(".py") and (root / p).stat().st_size > 0)
    assert (root / top_level[0]).stat().st_size in lengths
    assert set(D.sample_lengths("python-stdlib", 1000, seed=0, cap=None)) <= set(lengths)


def test_length_stats_on_a_known_list():
    stats = D.length_stats([1, 2, 3, 4, 40_000])
    assert stats["count"] == 5 and stats["tokens"] == 40_010 and stats["max"] == 40_000
    assert stats["median"] == 3 and stats["mean"] == 8002
    assert stats["token_share_over_32k"] == pytest.approx(40_000 / 40_010)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown distribution 'wiki'"):
        D.sample_lengths("wiki", 10, seed=0)
    with pytest.raises(ValueError, match="cap"):
        D.sample_lengths("wikipedia", 10, seed=0, cap=0)
    with pytest.raises(ValueError, match="at least one"):
        D.length_stats([])
