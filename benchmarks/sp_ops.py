"""Sequence-parallel attention ops side by side on gloo processes: forward + backward wall time
and bytes per rank of LASP-2 vs the pipelined scan vs LASP-1 vs Ulysses (linear attention),
LASP-2 vs scan vs ring for the gated delta rule, and LASP-2H vs Ulysses (softmax attention),
for W ranks and growing total lengths; plus an alpha-beta cost-model projection of the three
state-passing schemes to 64-256 ranks over NVLink and InfiniBand (a model, not a measurement).

    python benchmarks/sp_ops.py [--quick] [--world-sizes 2 4] [--out-dir DIR]
    seqmoe bench sp [--quick]

Every method runs through its ``*_in_context`` entry with one SPContext per configuration, as
the runtime calls it per micro-batch (no per-call validation or agreement collective).
Each configuration runs every method in the same processes, interleaved repeat by repeat, so
that they share the machine's conditions. A repeat's time is the slowest rank's (the step ends
when the last rank does). Writes sp_ops.json and sp_ops.png under --out-dir (default runs/bench/).
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

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, spawn_ranks, write_json  # noqa: E402
from parallel import comm  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from parallel.lasp2 import lasp2_attention_in_context  # noqa: E402
from parallel.lasp2_delta import lasp2_delta_rule_attention_in_context  # noqa: E402
from parallel.ring import lasp1_attention_in_context  # noqa: E402
from parallel.scan import scan_attention_in_context, scan_delta_rule_attention_in_context  # noqa: E402
from parallel.softmax_sp import allgather_attention_in_context  # noqa: E402
from parallel.sp_context import SPContext  # noqa: E402
from parallel.ulysses import ulysses_attention_in_context, ulysses_linear_attention_in_context  # noqa: E402

H, D = 4, 64


def linear_methods(sp, log_decay):
    """The runtime's entries (one SPContext per configuration, as per micro-batch in training):
    no per-call validation or agreement collective, only each method's own exchange."""
    methods = {
        "LASP-2": lambda q, k, v: lasp2_attention_in_context(q, k, v, sp, log_decay=log_decay),
        "Scan": lambda q, k, v: scan_attention_in_context(q, k, v, sp, log_decay=log_decay),
        "LASP-1": lambda q, k, v: lasp1_attention_in_context(q, k, v, sp, log_decay=log_decay),
    }
    if H % sp.num_ranks == 0:  # Ulysses splits the heads over the ranks
        methods["Ulysses"] = lambda q, k, v: ulysses_linear_attention_in_context(q, k, v, sp, log_decay=log_decay)
    return methods


def delta_methods(sp, beta, log_decay):
    """Gated delta rule: all-gather of (state, transition) vs the scan in 4 head pieces vs the
    same chain unpipelined (one piece: the LASP-1 ring)."""
    return {
        "LASP-2": lambda q, k, v: lasp2_delta_rule_attention_in_context(q, k, v, beta, sp, log_decay=log_decay),
        "Scan": lambda q, k, v: scan_delta_rule_attention_in_context(q, k, v, beta, sp, log_decay=log_decay, pieces=4),
        "LASP-1": lambda q, k, v: scan_delta_rule_attention_in_context(
            q, k, v, beta, sp, log_decay=log_decay, pieces=1
        ),
    }


def softmax_methods(sp):
    methods = {"LASP-2H": lambda q, k, v: allgather_attention_in_context(q, k, v, sp)}
    if H % sp.num_ranks == 0:
        methods["Ulysses"] = lambda q, k, v: ulysses_attention_in_context(q, k, v, sp)
    return methods


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
    sp = SPContext.build(ctx.world, local_len=T)
    if kind == "linear":
        methods = linear_methods(sp, log_decay)
    elif kind == "delta":
        k = torch.nn.functional.normalize(k, dim=-1)  # as the model does: the transitions contract
        methods = delta_methods(sp, torch.rand(1, T, H, generator=g), log_decay)
    else:
        methods = softmax_methods(sp)
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
        measured = _measure(ctx, kind, total_len, repeats)
        rows += measured
        if rank == 0:
            for row in measured:
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
    """Time ratios per (W, T) of linear attention (LASP-1 / LASP-2 and scan / LASP-2) and of the
    delta rule (scan / LASP-2 and ring / LASP-2): > 1 means LASP-2 is faster."""

    def ratio(kind: str, method: str, over: str) -> dict:
        out = {}
        for row in rows:
            if row["kind"] == kind and row["method"] == over:
                other = next(
                    r
                    for r in rows
                    if r["kind"] == kind
                    and r["method"] == method
                    and r["world_size"] == row["world_size"]
                    and r["total_len"] == row["total_len"]
                )
                out[f"W={row['world_size']},T={row['total_len']}"] = other["median_s"] / row["median_s"]
        return out

    return {
        "lasp1_over_lasp2_time": ratio("linear", "LASP-1", "LASP-2"),
        "scan_over_lasp2_time": ratio("linear", "Scan", "LASP-2"),
        "delta_scan_over_lasp2_time": ratio("delta", "Scan", "LASP-2"),
        "delta_ring_over_lasp2_time": ratio("delta", "LASP-1", "LASP-2"),
    }


# Link figures of the projection (assumed, per GPU and direction): NVLink 4 (H100 SXM, 900 GB/s
# bidirectional) and InfiniBand NDR 400 Gb/s per GPU; per-message latencies as NCCL reports them.
LINKS = {"NVLink-450GBps": (450e9, 3e-6), "IB-NDR-50GBps": (50e9, 6e-6)}


def project_state_passing(world_sizes=(8, 64, 128, 256), heads=16, head_dim=128, pieces=16) -> list[dict]:
    """alpha-beta model of one layer's forward state exchange, fp32, batch 1 (not measured).

    all-gather (ring algorithm): (W-1) (alpha + n/bw), every rank receives (W-1) n;
    LASP-1 ring: (W-1) sequential hops of (alpha + n/bw), one state received per rank;
    scan in p pieces: (W-1 + p-1) (alpha + n/(p bw)), one state received per rank.
    n = H*K*V*4 for linear attention; the delta rule's all-gather moves H*K*(V+K)*4 (state and
    transition) while its ring and scan move only the state."""
    state = heads * head_dim * head_dim * 4
    out = []
    for layer, gather_bytes in (("linear", state), ("delta", 2 * state)):
        for link, (bw, alpha) in LINKS.items():
            for W in world_sizes:
                out.append(
                    {
                        "layer": layer,
                        "link": link,
                        "world_size": W,
                        "allgather_bytes_received": (W - 1) * gather_bytes,
                        "chain_bytes_received": state,
                        "allgather_s": (W - 1) * (alpha + gather_bytes / bw),
                        "ring_s": (W - 1) * (alpha + state / bw),
                        "scan_s": (W - 1 + pieces - 1) * (alpha + state / pieces / bw),
                    }
                )
    return out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r["world_size"] for r in rows})
    fig, axes = plt.subplots(2, len(sizes), figsize=(5 * len(sizes), 7), squeeze=False)
    for col, W in enumerate(sizes):
        for kind, style in (("linear", "-"), ("delta", ":"), ("softmax", "--")):
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
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--linear-lengths", type=int, nargs="*", help="total lengths for linear attention")
    parser.add_argument("--softmax-lengths", type=int, nargs="*", help="total lengths for softmax attention")
    parser.add_argument("--delta-lengths", type=int, nargs="*", help="total lengths for the gated delta rule")
    parser.add_argument("--repeats", type=int)
    args = parser.parse_args()
    if args.quick:
        linear, softmax, delta, repeats = [4096, 16384], [4096, 8192], [4096], 3
    else:
        linear, softmax, repeats = [1024, 4096, 8192, 16384, 32768, 65536], [1024, 4096, 8192, 16384], 5
        delta = [1024, 4096, 16384]
    linear = linear if args.linear_lengths is None else args.linear_lengths
    softmax = softmax if args.softmax_lengths is None else args.softmax_lengths
    delta = delta if args.delta_lengths is None else args.delta_lengths
    repeats = args.repeats or repeats
    for n in linear + softmax + delta:
        if any(n % W for W in args.world_sizes):
            parser.error(f"length {n} is not divisible by every world size {args.world_sizes}")
    plan = [("linear", n) for n in linear] + [("delta", n) for n in delta] + [("softmax", n) for n in softmax]
    rows = []
    for W in args.world_sizes:
        rows += run_world(W, plan, repeats)
    config = {
        "heads": H,
        "head_dim": D,
        "batch": 1,
        "dtype": "float32",
        "decay": "per-head (linear and delta rule)",
        "repeats": repeats,
        "world_sizes": args.world_sizes,
        "quick": args.quick,
    }
    payload = {
        "machine": machine_info(),
        "config": config,
        "summary": summarise(rows),
        "rows": rows,
        "projection_model_not_measured": project_state_passing(),
    }
    path = write_json("sp_ops", payload, args.out_dir)
    plot(rows, args.out_dir / "sp_ops.png")
    for name, ratios in payload["summary"].items():
        for key, ratio in ratios.items():
            print(f"{name} at {key}: {ratio:.2f}")
    print(f"wrote {path} and {args.out_dir / 'sp_ops.png'}")


if __name__ == "__main__":
    main()
