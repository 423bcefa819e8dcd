"""Sequence-parallel attention ops side by side on gloo processes: forward + backward wall time
and bytes per rank of LASP-2 vs LASP-1 vs Ulysses (linear attention) and LASP-2H vs Ulysses
(softmax attention), for W ranks and growing total lengths.

    python benchmarks/sp_ops.py [--quick] [--world-sizes 2 4] [--out-dir DIR]
    seqmoe bench sp [--quick]

Each configuration runs every method in the same processes, interleaved repeat by repeat, so
that they share the machine's conditions. A repeat's time is the slowest rank's (the step ends
when the last rank does). Every method runs through its ``*_in_context`` entry with one SP
context built before the timing, as the runtime's layers do: the per-micro-batch agreement check
is not part of any op's time or bytes. Writes sp_ops.json and sp_ops.png under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_info, spawn_ranks, write_json  # noqa: E402
from parallel import comm  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from parallel.lasp2 import lasp2_attention_in_context  # noqa: E402
from parallel.ring import lasp1_attention_in_context  # noqa: E402
from parallel.softmax_sp import allgather_attention_in_context  # noqa: E402
from parallel.sp_context import SPContext  # noqa: E402
from parallel.ulysses import ulysses_attention_in_context, ulysses_linear_attention_in_context  # noqa: E402

H, D = 4, 64


def linear_methods(sp: SPContext, log_decay):
    return {
        "LASP-2": lambda q, k, v: lasp2_attention_in_context(q, k, v, sp, log_decay=log_decay),
        "LASP-1": lambda q, k, v: lasp1_attention_in_context(q, k, v, sp, log_decay=log_decay),
        "Ulysses": lambda q, k, v: ulysses_linear_attention_in_context(q, k, v, sp, log_decay=log_decay),
    }


def softmax_methods(sp: SPContext):
    return {
        "LASP-2H": lambda q, k, v: allgather_attention_in_context(q, k, v, sp),
        "Ulysses": lambda q, k, v: ulysses_attention_in_context(q, k, v, sp),
    }


def _one_repeat(ctx, fn, q, k, v, do) -> tuple[float, dict]:
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    dist.barrier(group=ctx.world)
    with comm.CommMeter() as meter:
        start = time.perf_counter()
        fn(*leaves).backward(do)
        elapsed = time.perf_counter() - start
    slowest = torch.tensor([elapsed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=ctx.world)
    return slowest.item(), meter.summary()


def _measure(ctx, kind: str, total_len: int, repeats: int) -> list[dict]:
    W, T = ctx.world_size, total_len // ctx.world_size
    g = torch.Generator().manual_seed(1000 + ctx.rank)
    q = torch.randn(1, T, H, D, generator=g) / D**0.5
    k = torch.randn(1, T, H, D, generator=g) / D**0.5
    v = torch.randn(1, T, H, D, generator=g)
    do = torch.randn(1, T, H, D, generator=g)
    log_decay = -torch.linspace(0.001, 0.05, H)
    sp = SPContext.build(ctx.world, local_len=T, device=ctx.device, agree=True)
    methods = linear_methods(sp, log_decay) if kind == "linear" else softmax_methods(sp)
    times = {name: [] for name in methods}
    volumes: dict[str, dict] = {}
    for fn in methods.values():  # warm-up, also of gloo's connections
        _one_repeat(ctx, fn, q, k, v, do)
    for _ in range(repeats):
        for name, fn in methods.items():
            elapsed, summary = _one_repeat(ctx, fn, q, k, v, do)
            times[name].append(elapsed)
            volumes[name] = summary
    # ranks move different volumes (the ring's ends talk to one neighbour): report the busiest
    per_rank: list[dict] = [None] * W
    dist.all_gather_object(per_rank, volumes, group=ctx.world)
    return [
        {
            "kind": kind,
            "method": name,
            "world_size": W,
            "total_len": total_len,
            "median_s": statistics.median(samples),
            "min_s": min(samples),
            "samples_s": samples,
            "bytes_sent_max_rank": max(sum(c["bytes_sent"] for c in v[name].values()) for v in per_rank),
            "bytes_received_max_rank": max(sum(c["bytes_received"] for c in v[name].values()) for v in per_rank),
            "collectives_by_rank": [v[name] for v in per_rank],
        }
        for name, samples in times.items()
    ]


def _worker(rank: int, world_size: int, store: str, job: tuple, queue) -> None:
    plan, repeats = job
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    # ranks share the machine's cores: one intra-op thread each, as a rank per core would have
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    ctx = ParallelContext.initialize(backend="gloo", device="cpu", init_method=f"file://{store}")
    rows = []
    for kind, total_len in plan:
        rows += _measure(ctx, kind, total_len, repeats)
        if rank == 0:
            for row in rows[-(3 if kind == "linear" else 2) :]:  # this configuration's methods
                print(
                    f"W={world_size} {kind:>7} T={total_len:>6} {row['method']:>8}: "
                    f"{row['median_s'] * 1e3:9.1f} ms  {row['bytes_sent_max_rank'] / 2**20:8.3f} MiB sent (max rank)",
                    flush=True,
                )
    if rank == 0:
        queue.put(rows)
    ctx.destroy()


def run_world(world_size: int, plan: list, repeats: int) -> list[dict]:
    return spawn_ranks(world_size, _worker, (plan, repeats))


def summarise(rows: list[dict]) -> dict:
    """LASP-1 / LASP-2 time ratio per (W, T): > 1 means LASP-2 is faster."""
    ratios = {}
    for row in rows:
        if row["method"] == "LASP-2":
            ring = next(
                r
                for r in rows
                if r["method"] == "LASP-1"
                and r["world_size"] == row["world_size"]
                and r["total_len"] == row["total_len"]
            )
            ratios[f"W={row['world_size']},T={row['total_len']}"] = ring["median_s"] / row["median_s"]
    return {"lasp1_over_lasp2_time": ratios}


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7), squeeze=False)
    for col, W in enumerate(sizes):
        for kind, style in (("linear", "-"), ("softmax", "--")):
            for method in sorted({r["method"] for r in rows if r["kind"] == kind}):
                mine = sorted(
                    (r for r in rows if r["world_size"] == W and r["kind"] == kind and r["method"] == method),
                    key=lambda r: r["total_len"],
                )
                if not mine:
                    continue
                label = f"{kind}: {method}"
                xs = [r["total_len"] for r in mine]
                axes[0][col].plot(xs, [r["median_s"] * 1e3 for r in mine], style, marker="o", label=label)
                axes[1][col].plot(xs, [r["bytes_sent_max_rank"] / 2**20 for r in mine], style, marker="o", label=label)
        axes[0][col].set_title(f"W = {W} gloo ranks: fwd+bwd time")
        axes[0][col].set_ylabel("ms (slowest rank, median)")
        axes[1][col].set_title(f"W = {W}: bytes sent by the busiest rank")
        axes[1][col].set_ylabel("MiB")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("total sequence length")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two lengths per kind, three repeats")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--linear-lengths", type=int, nargs="*", help="total lengths for linear attention")
    parser.add_argument("--softmax-lengths", type=int, nargs="*", help="total lengths for softmax attention")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    if args.quick:
        linear, softmax, repeats = [4096, 16384], [4096, 8192], 3
    else:
        linear, softmax, repeats = [1024, 4096, 8192, 16384, 32768, 65536], [1024, 4096, 8192, 16384], 5
    linear = linear if args.linear_lengths is None else args.linear_lengths
    softmax = softmax if args.softmax_lengths is None else args.softmax_lengths
    repeats = args.repeats or repeats
    for n in linear + softmax:
        if any(n % W for W in args.world_sizes):
            parser.error(f"length {n} is not divisible by every world size {args.world_sizes}")
    plan = [("linear", n) for n in linear] + [("softmax", n) for n in softmax]
    rows = []
    for W in args.world_sizes:
        rows += run_world(W, plan, repeats)
    config = {
        "heads": H,
        "head_dim": D,
        "batch": 1,
        "dtype": "float32",
        "decay": "per-head (linear)",
        "repeats": repeats,
        "world_sizes": args.world_sizes,
        "quick": args.quick,
    }
    payload = {"machine": machine_info(), "config": config, "summary": summarise(rows), "rows": rows}
    path = write_json("sp_ops", payload, args.out_dir)
    plot(rows, args.out_dir / "sp_ops.png")
    for key, ratio in payload["summary"]["lasp1_over_lasp2_time"].items():
        print(f"LASP-1 time / LASP-2 time at {key}: {ratio:.2f}")
    print(f"wrote {path} and {args.out_dir / 'sp_ops.png'}")


if __name__ == "__main__":
    main()
