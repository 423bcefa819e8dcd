"""Kernel benchmarks on CPU, side by side in one run: packed softmax attention by one dense mask
vs per document vs the documents attended one by one, and MoE experts looped vs grouped.

    python benchmarks/kernels.py [--quick] [--out-dir DIR]      (= seqmoe bench kernels)

Softmax attention: one rank's LASP-2H local compute, causal, fp32, forward + backward, H=4,
d=64, one torch thread. At W=1 (``packed_attention``: the queries and keys are the whole packed
sequence of N tokens) and at W=--ranks (the last rank's block of N/W queries over all N keys;
mixed documents, so that one crosses the block's start). Documents: all of 256 tokens (the
issue's case), or seeded log-uniform lengths in [64, 2048]. Methods:

* ``dense``: ``packed_attention(method="dense")``, one boolean mask over the visible window
  (the former path; W=1 only, skipped above ``--dense-max-tokens``, its mask is N² bytes);
* ``per_doc``: ``packed_attention`` (``parallel.doc_attention``, SDPA per document);
* ``one_by_one``: every document piece by its own SDPA call with ``is_causal`` (the piece whose
  document began before the block: under its bottom-right mask, made once), its q, k, v leaves
  of their own (the baseline the target ratio per_doc / one_by_one <= 1.2 refers to);
* ``per_doc_window`` (W > 1): per_doc given k/v of only the block's visible key window, i.e.
  without the full-size zero gradients of the keys before it that LASP-2H's gathered K/V need.

The upstream gradient of each method is made once, outside the timed step. Also the partial
piece alone (1,024 queries of a 2,048-token document): per_doc's split vs the masked piece vs
the whole document.

MoE: one ``MoELayer`` (linear router, top-2, no balance loss) forward + backward on T tokens,
``expert_compute="loop"`` vs ``"grouped"``, tokens/s; plus the cost of stacking the expert
weights per call (forward + backward of ``torch.stack``), which the grouped path pays.

Methods are interleaved repeat by repeat, the first one rotating (the machine is shared, so
drifts hit all alike). Each repeat is timed by wall clock and by process CPU time (one thread:
CPU time barely moves with the machine's load, wall time also counts the waits for a core).
Rows give the ratios of medians, of fastest repeats and the median of per-round ratios, for
both clocks, and the load average. Writes kernels.json (after each section) and kernels.png to
--out-dir (default runs/bench, not the committed benchmarks/results/).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, write_json  # noqa: E402
from moe import MoELayer  # noqa: E402
from parallel.doc_attention import document_pieces, piece_work  # noqa: E402
from parallel.softmax_sp import packed_attention  # noqa: E402

H, D = 4, 64
SCALE = D**-0.5
# (name, d_model, expert hidden, experts): the tiny-cpu preset's MoE, a fine-grained one, a wide one
MOE_SHAPES = [("tiny-cpu", 128, 256, 8), ("fine-grained", 128, 64, 32), ("wide", 512, 1024, 8)]


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1, max_repeats: dict[str, int] | None = None
) -> dict[str, dict]:
    """Wall and process CPU time of each fn, run round-robin (a fn listed in ``max_repeats``
    runs in the first rounds only): {name: {median_s, min_s, samples_s, cpu_median_s, cpu_min_s,
    cpu_samples_s}}. Torch runs one thread, so CPU time is the work of this process alone: on a
    shared machine it barely moves with the load, while wall time also counts the waits for a core."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        # rotate who goes first: a method run right after a big one (the dense mask frees GBs)
        # pays the page faults of fresh allocations, so no method may always follow another
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if r >= (max_repeats or {}).get(name, repeats):
                continue
            start_cpu, start = time.process_time(), time.perf_counter()
            fns[name]()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return {
        name: {
            "median_s": statistics.median(wall[name]),
            "min_s": min(wall[name]),
            "samples_s": wall[name],
            "cpu_median_s": statistics.median(cpu[name]),
            "cpu_min_s": min(cpu[name]),
            "cpu_samples_s": cpu[name],
        }
        for name in names
    }


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


def _attention_fns(N: int, bounds: list[int], *, ranks: int, with_dense: bool) -> dict[str, Callable[[], None]]:
    """One rank's local compute: the last of ``ranks`` query blocks (T = N / ranks queries at
    ``q_offset = N - T``) over all N keys, as LASP-2H runs it after the K/V all-gather."""
    g = torch.Generator().manual_seed(N)
    T = N // ranks
    q_offset = N - T
    q = torch.randn(1, T, H, D, generator=g).requires_grad_()
    k, v = (torch.randn(1, N, H, D, generator=g).requires_grad_() for _ in range(2))
    # the upstream gradient is an input of the kernel, made once (as it is for the baseline)
    grad_o = torch.ones(1, T, H, D)

    def packed(method: str) -> Callable[[], None]:
        def step() -> None:
            # fresh gradients each step (as for activations in training): accumulating into .grad
            # would add a full-size read-modify-write per leaf that training never pays
            q.grad = k.grad = v.grad = None
            o = packed_attention(q, k, v, q_offset=q_offset, causal=True, bounds=bounds, scale=SCALE, method=method)
            o.backward(grad_o)

        return step

    # each piece's q, k, v are leaves of their own (as if each document were its own batch):
    # slicing one packed leaf would add an O(N) gradient buffer per document to the baseline.
    # A piece whose document began before the block gets its bottom-right causal mask, made once.
    docs = []
    for p in document_pieces(q_offset, T, N, causal=True, bounds=bounds):
        q_p = q[:, p.q0 : p.q1].transpose(1, 2).detach().clone().requires_grad_()
        k_p, v_p = (t[:, p.k0 : p.k1].transpose(1, 2).detach().clone().requires_grad_() for t in (k, v))
        Lq, Lk = p.q1 - p.q0, p.k1 - p.k0
        mask = None if p.square else torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
        docs.append((q_p, k_p, v_p, mask, torch.ones(1, H, Lq, D)))

    def one_by_one() -> None:
        for q_p, k_p, v_p, mask, grad_p in docs:
            q_p.grad = k_p.grad = v_p.grad = None
            o = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask, is_causal=mask is None, scale=SCALE)
            o.backward(grad_p)

    fns = {"per_doc": packed("auto"), "one_by_one": one_by_one}
    if with_dense:
        fns["dense"] = packed("dense")
    if ranks > 1:
        fns["per_doc_window"] = _window_fn(q, k, v, grad_o, q_offset=q_offset, bounds=bounds)
    return fns


def _window_fn(
    q: Tensor, k: Tensor, v: Tensor, grad_o: Tensor, *, q_offset: int, bounds: list[int]
) -> Callable[[], None]:
    """per_doc with k/v leaves of only the block's visible key window ``[lo, N)``: the kernel
    without the zero gradients LASP-2H's full-size gathered K/V need for the keys before it."""
    T, N = q.shape[1], k.shape[1]
    lo = document_pieces(q_offset, T, N, causal=True, bounds=bounds)[0].k0
    q_w = q.detach().clone().requires_grad_()
    k_w, v_w = (t[:, lo:].detach().clone().requires_grad_() for t in (k, v))
    bounds_w = [0] + [b - lo for b in bounds if b > lo]

    def step() -> None:
        q_w.grad = k_w.grad = v_w.grad = None
        o = packed_attention(q_w, k_w, v_w, q_offset=q_offset - lo, causal=True, bounds=bounds_w, scale=SCALE)
        o.backward(grad_o)

    return step


def _ratios(timing: dict[str, dict], stat: str) -> dict[str, float]:
    return {m: t[stat] / timing["one_by_one"][stat] for m, t in timing.items()}


def _paired_ratio(timing: dict[str, dict], samples: str) -> float:
    """Median over repeats of per_doc / one_by_one in the same round (run back to back, so under
    about the same load: steadier than a ratio of medians when the load drifts)."""
    pairs = zip(timing["per_doc"][samples], timing["one_by_one"][samples], strict=True)
    return statistics.median(a / b for a, b in pairs)


def bench_attention(
    sizes: list[int], cases: list[tuple[str, int]], *, repeats: int, dense_max: int, dense_repeats: int
) -> list[dict]:
    """One row per (packed tokens, (documents, ranks)); the dense mask only at one rank."""
    rows = []
    for N in sizes:
        for dist, ranks in cases:
            lengths = doc_lengths(dist, N)
            bounds = _bounds(lengths)
            T = N // ranks
            pieces = document_pieces(N - T, T, N, causal=True, bounds=bounds)
            with_dense = ranks == 1 and dense_max >= N
            load_before = os.getloadavg()
            fns = _attention_fns(N, bounds, ranks=ranks, with_dense=with_dense)
            timing = interleaved(fns, repeats=repeats, max_repeats={"dense": dense_repeats})
            row = {
                "tokens": N,
                "docs": dist,
                "ranks": ranks,
                "query_tokens": T,
                "q_offset": N - T,
                "num_docs": len(lengths),
                "doc_len_min": min(lengths),
                "doc_len_max": max(lengths),
                "pieces": len(pieces),
                # the piece whose document began on an earlier rank: (queries, keys), or None
                "partial_piece": None
                if pieces[0].square
                else [pieces[0].q1 - pieces[0].q0, pieces[0].k1 - pieces[0].k0],
                "score_entries": piece_work(pieces),
                "timing": timing,
                "ratio_to_one_by_one": _ratios(timing, "median_s"),
                # the machine is shared: the fastest repeat is the least disturbed one
                "min_ratio_to_one_by_one": _ratios(timing, "min_s"),
                # process CPU time (one thread): what the load barely changes
                "cpu_ratio_to_one_by_one": _ratios(timing, "cpu_median_s"),
                "cpu_min_ratio_to_one_by_one": _ratios(timing, "cpu_min_s"),
                "paired_ratio": {
                    "wall": _paired_ratio(timing, "samples_s"),
                    "cpu": _paired_ratio(timing, "cpu_samples_s"),
                },
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            }
            rows.append(row)
            per_doc = f"per_doc/one_by_one wall {row['ratio_to_one_by_one']['per_doc']:.2f}x"
            per_doc += f" (fastest {row['min_ratio_to_one_by_one']['per_doc']:.2f}x)"
            per_doc += f" cpu {row['cpu_ratio_to_one_by_one']['per_doc']:.2f}x"
            per_doc += f" (fastest {row['cpu_min_ratio_to_one_by_one']['per_doc']:.2f}x)"
            per_doc += f" paired wall {row['paired_ratio']['wall']:.2f}x cpu {row['paired_ratio']['cpu']:.2f}x"
            dense = f" dense {row['ratio_to_one_by_one']['dense']:.1f}x" if with_dense else ""
            if ranks > 1:
                dense = f" per_doc_window cpu {row['cpu_ratio_to_one_by_one']['per_doc_window']:.2f}x"
            times = "  ".join(
                f"{m} {t['median_s'] * 1e3:.0f}/{t['cpu_median_s'] * 1e3:.0f} ms" for m, t in timing.items()
            )
            print(
                f"softmax N={N:>6} {dist:>10} W={ranks} ({len(pieces):>3} pieces): wall/cpu {times} | {per_doc}{dense}"
                f" | load {load_before[0]:.1f}",
                flush=True,
            )
    return rows


def _partial_piece_fns(doc: int, queries: int) -> dict[str, Callable[[], None]]:
    """The piece of a ``doc``-token document whose last ``queries`` tokens are a rank's block:
    per_doc's split (an unmasked rectangle plus a causal square merged by log-sum-exp), the piece
    under its explicit bottom-right mask (the former path), and the whole document on one rank."""
    g = torch.Generator().manual_seed(doc)
    q = torch.randn(1, queries, H, D, generator=g).requires_grad_()
    k, v = (torch.randn(1, doc, H, D, generator=g).requires_grad_() for _ in range(2))
    grad_o = torch.ones(1, queries, H, D)

    def split() -> None:
        q.grad = k.grad = v.grad = None
        o = packed_attention(q, k, v, q_offset=doc - queries, causal=True, bounds=None, scale=SCALE)
        o.backward(grad_o)

    leaves = [t.transpose(1, 2).detach().clone().requires_grad_() for t in (q, k, v)]
    mask = torch.ones(queries, doc, dtype=torch.bool).tril(doc - queries)

    def masked() -> None:
        q_p, k_p, v_p = leaves
        q_p.grad = k_p.grad = v_p.grad = None
        o = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask, scale=SCALE)
        o.backward(grad_o.transpose(1, 2))

    q_doc = torch.randn(1, H, doc, D, generator=g).requires_grad_()
    k_doc, v_doc = (t.detach().clone().requires_grad_() for t in leaves[1:])
    grad_doc = torch.ones(1, H, doc, D)

    def whole_doc() -> None:
        q_doc.grad = k_doc.grad = v_doc.grad = None
        o = F.scaled_dot_product_attention(q_doc, k_doc, v_doc, is_causal=True, scale=SCALE)
        o.backward(grad_doc)

    return {"split": split, "masked": masked, "whole_doc": whole_doc}


def bench_partial_piece(doc: int, queries: int, *, repeats: int) -> dict:
    timing = interleaved(_partial_piece_fns(doc, queries), repeats=repeats)
    entries = {"split": queries * (doc - queries) + queries * (queries + 1) // 2, "whole_doc": doc * (doc + 1) // 2}
    entries["masked"] = entries["split"]
    row = {
        "doc": doc,
        "queries": queries,
        "score_entries": entries,
        "timing": timing,
        "cpu_ratio_to_masked": {m: t["cpu_median_s"] / timing["masked"]["cpu_median_s"] for m, t in timing.items()},
        # CPU ns per score entry and head: the work-proportional cost of each way
        "cpu_ns_per_entry": {m: t["cpu_median_s"] * 1e9 / (entries[m] * H) for m, t in timing.items()},
        "loadavg": os.getloadavg(),
    }
    ns = "  ".join(f"{m} {t * 1e3:.0f} ms" for m, t in ((m, t["cpu_median_s"]) for m, t in timing.items()))
    print(f"partial piece ({queries} queries of a {doc}-token document), cpu: {ns}", flush=True)
    return row


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
    """Least squares t = a · (score entries · H) + b · query tokens over the per_doc rows (fwd +
    bwd, process CPU time: the wall time of a loaded machine is too noisy to fit)."""
    xs = [(r["score_entries"] * H, r["query_tokens"]) for r in rows]
    ts = [r["timing"]["per_doc"]["cpu_median_s"] * 1e3 for r in rows]
    if len(rows) < 2:
        return {"note": "not fitted: fewer than 2 points"}
    X = torch.tensor(xs, dtype=torch.float64)
    y = torch.tensor(ts, dtype=torch.float64)
    coef = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    pred = (X @ torch.tensor(coef, dtype=torch.float64)).tolist()
    return {
        "formula": "cpu_ms = a_ms_per_entry * H * sum_docs(q_tokens * visible_keys) + b_ms_per_token * query_tokens",
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
    labels = [
        f"{r['tokens'] // 1024}K W={r['ranks']}\n{'all-256' if r['docs'] == 'uniform256' else r['docs']}" for r in rows
    ]
    bars = [("per_doc", "ratio_to_one_by_one", "per_doc wall"), ("per_doc", "cpu_ratio_to_one_by_one", "per_doc CPU")]
    bars.append(("dense", "ratio_to_one_by_one", "dense wall"))
    width = 0.27
    for i, (m, key, label) in enumerate(bars):
        values = [r[key].get(m, float("nan")) for r in rows]
        ax1.bar([j + (i - 1) * width for j in range(len(rows))], values, width, label=label)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.axhline(1.2, color="r", lw=0.8, ls="--", label="target 1.2x")
    ax1.set_yscale("log")
    ax1.set_xticks(range(len(rows)), labels, fontsize=7)
    ax1.set_ylabel("time / documents one by one (fwd+bwd, median)")
    ax1.set_title(f"packed causal softmax attention, H={H} d={D} fp32 CPU")
    ax1.legend(fontsize=8)
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
    parser.add_argument("--repeats", type=int, help="timed repeats per method (default 9, --quick 3)")
    parser.add_argument("--dense-max-tokens", type=int, default=16384, help="largest N the dense mask runs at")
    parser.add_argument("--dense-repeats", type=int, default=2, help="timed repeats of the dense mask (seconds each)")
    parser.add_argument("--ranks", type=int, default=4, help="W of the LASP-2H rows (the last rank's block)")
    parser.add_argument("--moe-tokens", type=int, default=4096, help="tokens per MoE layer call")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)  # process CPU time is then this one thread's work
    sizes = args.sizes or ([8192] if args.quick else [8192, 16384, 32768])
    repeats = args.repeats or (3 if args.quick else 9)
    shapes = MOE_SHAPES[:2] if args.quick else MOE_SHAPES
    config = {
        "heads": H,
        "head_dim": D,
        "dtype": "float32",
        "causal": True,
        "sizes": sizes,
        "repeats": repeats,
        "dense_max_tokens": args.dense_max_tokens,
        "dense_repeats": args.dense_repeats,
        "ranks": args.ranks,
        "moe_tokens": args.moe_tokens,
        "threads": torch.get_num_threads(),
        "quick": args.quick,
    }
    result = {"machine": machine_info(), "config": config, "softmax": [], "moe": []}
    # W = 1 (the benchmark) for both layouts; W > 1 with mixed documents, which cross
    # the block's start (all-256 documents end on it)
    cases = [("uniform256", 1), ("mixed", 1), ("mixed", args.ranks)]
    result["softmax"] = bench_attention(
        sizes, cases, repeats=repeats, dense_max=args.dense_max_tokens, dense_repeats=args.dense_repeats
    )
    result["attention_cost_fit"] = fit_attention_cost(result["softmax"])
    result["partial_piece"] = bench_partial_piece(2048, 1024, repeats=repeats)
    write_json("kernels", result, args.out_dir)
    result["moe"] = bench_moe(args.moe_tokens, shapes, repeats=repeats)
    path = write_json("kernels", result, args.out_dir)
    plot(result, args.out_dir / "kernels.png")
    print(f"wrote {path} and {args.out_dir / 'kernels.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
