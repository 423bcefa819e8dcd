"""Kernel benchmarks on CPU, side by side in one run: packed softmax attention by one dense mask
vs per document vs the documents attended one by one, and MoE experts looped vs grouped.

    python benchmarks/kernels.py [--quick] [--out-dir DIR]      (= seqmoe bench kernels)

Softmax attention: one rank's LASP-2H local compute at W=1 (``packed_attention``: the queries
and keys are the whole packed sequence of N tokens), causal, fp32, forward + backward, H=4,
d=64. Documents: all of 256 tokens (the issue's case), or seeded log-uniform lengths in
[64, 2048]. Methods:

* ``dense``: ``packed_attention(method="dense")``, one boolean mask over the visible window
  (the former path; skipped above ``--dense-max-tokens``, its mask is N² bytes);
* ``per_doc``: ``packed_attention`` (``parallel.doc_attention``, bucketed SDPA per document);
* ``one_by_one``: every document by its own SDPA call with ``is_causal``, its q, k, v leaves
  of their own (the baseline the target ratio per_doc / one_by_one <= 1.2 refers to).

MoE: one ``MoELayer`` (linear router, top-2, no balance loss) forward + backward on T tokens,
``expert_compute="loop"`` vs ``"grouped"``, tokens/s; plus the cost of stacking the expert
weights per call (forward + backward of ``torch.stack``), which the grouped path pays.

Methods are interleaved repeat by repeat, the first one rotating (the machine is shared, so
drifts hit all alike); rows give the ratio of medians and the ratio of fastest repeats.
Writes kernels.json (after each section) and kernels.png to --out-dir (default
runs/bench, not the committed benchmarks/results/).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, write_json  # noqa: E402
from moe import MoELayer  # noqa: E402
from parallel.doc_attention import document_pieces, piece_work  # noqa: E402
from parallel.softmax_sp import packed_attention  # noqa: E402

H, D = 4, 64
SCALE = D**-0.5
# (name, d_model, expert hidden, experts): the tiny-cpu preset's MoE, a fine-grained one, a wide one
MOE_SHAPES = [("tiny-cpu", 128, 256, 8), ("fine-grained", 128, 64, 32), ("wide", 512, 1024, 8)]


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, dict]:
    """Wall time of each fn, run round-robin: {name: {median_s, min_s, samples_s}}."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        # rotate who goes first: a method run right after a big one (the dense mask frees GBs)
        # pays the page faults of fresh allocations, so no method may always follow another
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s} for name, s in samples.items()}


def doc_lengths(kind: str, total: int, seed: int = 0) -> list[int]:
    """Document lengths summing to ``total``: ``uniform256`` or ``mixed`` (log-uniform in [64, 2048])."""
    if kind == "uniform256":
        lengths = [256] * (total // 256)
        return lengths + ([total % 256] if total % 256 else [])
    rng, lengths = random.Random(seed * 1_000_003 + total), []
    while sum(lengths) < total:
        lengths.append(min(int(2 ** rng.uniform(6, 11)), total - sum(lengths)))
    return lengths


def _bounds(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _attention_fns(N: int, bounds: list[int], *, with_dense: bool) -> dict[str, Callable[[], None]]:
    g = torch.Generator().manual_seed(N)
    q, k, v = (torch.randn(1, N, H, D, generator=g).requires_grad_() for _ in range(3))

    def packed(method: str) -> Callable[[], None]:
        def step() -> None:
            # fresh gradients each step (as for activations in training): accumulating into .grad
            # would add a full-size read-modify-write per leaf that training never pays
            q.grad = k.grad = v.grad = None
            o = packed_attention(q, k, v, q_offset=0, causal=True, bounds=bounds, scale=SCALE, method=method)
            o.backward(torch.ones_like(o))

        return step

    # each document's q, k, v are leaves of their own (as if each document were its own batch):
    # slicing one packed leaf would add an O(N) gradient buffer per document to the baseline
    docs = [
        [t[:, a:b].transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
        for a, b in zip(bounds[:-1], bounds[1:])
    ]

    def one_by_one() -> None:
        for qd, kd, vd in docs:
            qd.grad = kd.grad = vd.grad = None
            o = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=SCALE)
            o.backward(torch.ones_like(o))

    fns = {"per_doc": packed("auto"), "one_by_one": one_by_one}
    if with_dense:
        fns["dense"] = packed("dense")
    return fns


def bench_attention(sizes: list[int], dists: list[str], *, repeats: int, dense_max: int) -> list[dict]:
    rows = []
    for N in sizes:
        for dist in dists:
            lengths = doc_lengths(dist, N)
            bounds = _bounds(lengths)
            pieces = document_pieces(0, N, N, causal=True, bounds=bounds)
            timing = interleaved(_attention_fns(N, bounds, with_dense=dense_max >= N), repeats=repeats)
            base = timing["one_by_one"]["median_s"]
            row = {
                "tokens": N,
                "docs": dist,
                "num_docs": len(lengths),
                "doc_len_min": min(lengths),
                "doc_len_max": max(lengths),
                "score_entries": piece_work(pieces),
                "timing": timing,
                "ratio_to_one_by_one": {m: t["median_s"] / base for m, t in timing.items()},
                # the machine is shared: the fastest repeat is the least disturbed one
                "min_ratio_to_one_by_one": {m: t["min_s"] / timing["one_by_one"]["min_s"] for m, t in timing.items()},
            }
            rows.append(row)
            ratios = "  ".join(f"{m} {r:6.2f}x" for m, r in row["ratio_to_one_by_one"].items())
            times = "  ".join(f"{m} {t['median_s'] * 1e3:8.1f} ms" for m, t in timing.items())
            print(
                f"softmax N={N:>6} {dist:>10} ({len(lengths):>3} docs): {times} | vs one_by_one: {ratios}", flush=True
            )
    return rows


def _moe_fns(d: int, hidden: int, E: int, tokens: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(tokens, d, requires_grad=True)
    layers = {
        c: MoELayer(d, hidden, num_experts=E, top_k=2, router="linear", balance_coef=0.0, expert_compute=c)
        for c in ("loop", "grouped")
    }
    layers["grouped"].load_state_dict(layers["loop"].state_dict())

    def run(layer: MoELayer) -> Callable[[], None]:
        def step() -> None:
            y, _ = layer(x)
            y.backward(torch.ones_like(y))

        return step

    experts = layers["grouped"].local_experts

    def stack_only() -> None:
        w_up = torch.stack([e.up.weight for e in experts])
        w_down = torch.stack([e.down.weight for e in experts])
        (w_up.sum() + w_down.sum()).backward()

    return {"loop": run(layers["loop"]), "grouped": run(layers["grouped"]), "stack_weights": stack_only}


def bench_moe(tokens: int, shapes: list[tuple], *, repeats: int) -> list[dict]:
    rows = []
    for name, d, hidden, E in shapes:
        timing = interleaved(_moe_fns(d, hidden, E, tokens), repeats=repeats)
        row = {
            "shape": name,
            "d_model": d,
            "hidden": hidden,
            "experts": E,
            "top_k": 2,
            "tokens": tokens,
            "timing": timing,
            "tokens_per_s": {c: tokens / timing[c]["median_s"] for c in ("loop", "grouped")},
            "stack_ms": timing["stack_weights"]["median_s"] * 1e3,
        }
        row["grouped_speedup"] = row["tokens_per_s"]["grouped"] / row["tokens_per_s"]["loop"]
        rows.append(row)
        print(
            f"moe {name:>12} d={d} h={hidden} E={E} T={tokens}: loop {row['tokens_per_s']['loop']:9.0f} tok/s  "
            f"grouped {row['tokens_per_s']['grouped']:9.0f} tok/s  ({row['grouped_speedup']:.2f}x)  "
            f"stacking {row['stack_ms']:.2f} ms",
            flush=True,
        )
    return rows


def fit_attention_cost(rows: list[dict]) -> dict:
    """Least squares t = a · (score entries · H) + b · tokens over the per_doc rows (fwd + bwd)."""
    xs = [(r["score_entries"] * H, r["tokens"]) for r in rows]
    ts = [r["timing"]["per_doc"]["median_s"] * 1e3 for r in rows]
    if len(rows) < 2:
        return {"note": "not fitted: fewer than 2 points"}
    X = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ts, dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    pred = (X @ torch.tensor(coef, dtype=torch.float64)).tolist()
    return {
        "formula": "t_ms = a_ms_per_entry * H * sum_docs(q_tokens * visible_keys) + b_ms_per_token * tokens",
        "a_ms_per_entry": coef[0],
        "b_ms_per_token": coef[1],
        "head_dim": D,
        "max_rel_error": max(abs(p - t) / t for p, t in zip(pred, ts)),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["softmax"]
    labels = [f"{r['tokens'] // 1024}K\n{r['docs']}" for r in rows]
    methods = ["per_doc", "dense"]
    width = 0.38
    for i, m in enumerate(methods):
        values = [r["ratio_to_one_by_one"].get(m, float("nan")) for r in rows]
        ax1.bar([j + (i - 0.5) * width for j in range(len(rows))], values, width, label=m)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(1.2, color="r", lw=0.8, ls="--", label="target 1.2x")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(rows)), labels, fontsize=8)
    ax1.set_ylabel("time / documents one by one (fwd+bwd)")
    ax1.set_title(f"packed causal softmax attention, H={H} d={D} fp32 CPU")
    ax1.legend()
    moe_rows = result["moe"]
    for i, c in enumerate(("loop", "grouped")):
        values = [r["tokens_per_s"][c] / 1e3 for r in moe_rows]
        ax2.bar([j + (i - 0.5) * width for j in range(len(moe_rows))], values, width, label=c)
    ax2.set_xticks(range(len(moe_rows)), [f"{r['shape']}\nE={r['experts']} h={r['hidden']}" for r in moe_rows])
    ax2.set_ylabel("MoE layer fwd+bwd (K tokens/s)")
    ax2.set_title("experts looped vs grouped, fp32 CPU")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8K tokens only, fewer repeats")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--sizes", type=int, nargs="+", help="packed tokens (default 8192 16384 32768)")
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default 5, --quick 2)")
    parser.add_argument("--dense-max-tokens", type=int, default=16384, help="largest N the dense mask runs at")
    parser.add_argument("--moe-tokens", type=int, default=4096, help="tokens per MoE layer call")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = args.sizes or ([8192] if args.quick else [8192, 16384, 32768])
    repeats = args.repeats or (2 if args.quick else 5)
    shapes = MOE_SHAPES[:2] if args.quick else MOE_SHAPES
    config = {
        "heads": H,
        "head_dim": D,
        "dtype": "float32",
        "causal": True,
        "sizes": sizes,
        "repeats": repeats,
        "dense_max_tokens": args.dense_max_tokens,
        "moe_tokens": args.moe_tokens,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    result = {"machine": machine_info(), "config": config, "softmax": [], "moe": []}
    result["softmax"] = bench_attention(
        sizes, ["uniform256", "mixed"], repeats=repeats, dense_max=args.dense_max_tokens
    )
    result["attention_cost_fit"] = fit_attention_cost(result["softmax"])
    write_json("kernels", result, args.out_dir)
    result["moe"] = bench_moe(args.moe_tokens, shapes, repeats=repeats)
    path = write_json("kernels", result, args.out_dir)
    plot(result, args.out_dir / "kernels.png")
    print(f"wrote {path} and {args.out_dir / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
