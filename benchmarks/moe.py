"""MoE side by side: step-time overhead under expert parallelism over gloo, and quality in
miniature, of global vs micro load balancing, GRU vs linear routers and Chain-of-Experts vs MoE.

    python benchmarks/moe.py [--quick] [--out-dir DIR]
    seqmoe bench moe [--quick]

Variants (one small hybrid "LLLS" model, MoE FFN in every layer, 16 experts, top-4):

- ``micro``: micro-batch LBL, linear router (the DeepSpeed / Megatron aux_loss baseline);
- ``global``: global-batch LBL (counts summed over ranks and the GA buffer), linear router;
- ``global+gru``: global LBL, RMoE's recurrent GRU router;
- ``global+coe``: global LBL, Chain-of-Experts with C=2 iterations of top-2 each (the expert
  compute of top-4 MoE).

1. **Quality** (single process per run, plain AdamW, several seeds, runs in parallel jobs): each
   step takes a global batch of mixed-domain sequences (code / prose / tables) from the embedded
   corpus and runs it as micro-batches of ``--micro-seqs`` sequences (gradient accumulation).
   ``micro`` balances each micro-batch alone; ``global`` balances the GA buffer of the whole
   step, i.e. the global batch, as Algorithm 1 of the paper does across ranks. Held-out
   validation batches give the loss, MaxVio and per-domain expert selection frequencies.
   Specialisation score: mean over MoE sites (layers; CoE iterations) of the mean pairwise
   Jensen-Shannon divergence (bits, in [0, 1]) between the domains' expert-selection
   distributions; "hot pairs": the share of (domain, expert) pairs selected above 1.5x the
   uniform frequency k/E.
2. **Overhead** (W spawned gloo ranks, expert parallelism over ``--ep-sizes``): every variant
   in the same processes, interleaved repeat by repeat; a repeat is one step (``--ga``
   micro-batches of forward + backward + aux loss) on an uneven share of a global batch per rank
   (ranks hold 1:2:...:W shares); its time is the slowest rank's. Measured with freshly
   initialised weights and with the seed-0 weights trained in part 1 (trained routers route
   less evenly, which is where most of the paper's global-LBL overhead came from). Bytes per
   step come from ``parallel.comm.CommMeter``.

Writes moe.json, moe.png and moe_domains.png under --out-dir (default runs/bench/).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # CPU + gloo benchmark; deepspeed reads this on import

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, spawn_ranks, write_json  # noqa: E402
from moe.metrics import max_violation  # noqa: E402
from parallel import comm  # noqa: E402
from parallel.context import ParallelContext  # noqa: E402
from parallel.sp_context import SPContext  # noqa: E402
from planner.plan import Group, MicroBatch, StepPlan  # noqa: E402
from runtime.config import DataConfig, ModelConfig, MoEConfig, ParallelConfig  # noqa: E402
from runtime.data import build_dataset  # noqa: E402
from runtime.model import build_model  # noqa: E402
from runtime.step import LocalEngine, run_plan, train_step  # noqa: E402

VARIANTS = {
    "micro": {"balance": "micro", "router": "linear", "chain_iterations": 1},
    "global": {"balance": "global", "router": "linear", "chain_iterations": 1},
    "global+gru": {"balance": "global", "router": "gru", "chain_iterations": 1},
    "global+coe": {"balance": "global", "router": "linear", "chain_iterations": 2},
}
# (name, variant, baseline, the paper's claim)
COMPARISONS = [
    ("global_vs_micro", "global", "micro", "Qiu et al. 2025: global LBL lowers PPL (8.167 -> 8.038) and specialises"),
    ("gru_vs_linear", "global+gru", "global", "RMoE: GRU router lowers test BPC 1.128 -> 1.116 (Enwiki8)"),
    ("coe_vs_moe", "global+coe", "global", "CoE: C=2 x top-K/2 lowers val loss 1.20 -> 1.12 at equal compute"),
]
PAPER_OVERHEAD = {
    "global_vs_micro": "+5.8% step time (+2.6% with a 1% micro term); target <= 2% with overlap",
    "gru_vs_linear": "+0.4% (0.91B) to +1.3% (36M) step time",
    "coe_vs_moe": "'small wall-clock slowdown' (single device); EP untested by the authors",
}
IGNORE = -100


def configs(setup: dict, variant: str, ep_size: int = 1) -> tuple[ModelConfig, MoEConfig]:
    model = ModelConfig(layer_pattern="LLLS", num_layers=setup["layers"], d_model=setup["d_model"], num_heads=4,
                        num_kv_heads=2, ffn_hidden=setup["expert_hidden"], ffn="moe")  # fmt: skip
    moe = MoEConfig(num_experts=setup["experts"], top_k=setup["top_k"], router_dim=setup["router_dim"],
                    balance_coef=setup["balance_coef"], ep_size=ep_size, **VARIANTS[variant])  # fmt: skip
    return model, moe


def dataset(setup: dict):
    data_cfg = DataConfig(source="embedded", max_seq_len=setup["seq_len"], global_batch_sequences=setup["batch_seqs"])
    return build_dataset(data_cfg, vocab_size=256)


def pack(sequences: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens [1, T], next-token targets [T] (IGNORE at each document's last token), cu_seqlens."""
    tokens = torch.cat(sequences)
    targets = torch.cat([torch.cat([s[1:], s.new_tensor([IGNORE])]) for s in sequences])
    lengths = torch.tensor([len(s) for s in sequences])
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
    return tokens[None], targets, cu_seqlens


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def split_even(items: list, parts: int) -> list[list]:
    """Exactly ``parts`` consecutive pieces, sizes differing by at most one."""
    sizes = [len(items) // parts + (i < len(items) % parts) for i in range(parts)]
    starts = [sum(sizes[:i]) for i in range(parts)]
    return [items[a : a + n] for a, n in zip(starts, sizes)]


def microbatch_loss(model, sequences, *, num_tokens: int, num_targets: int, domains_T=None) -> torch.Tensor:
    """This micro-batch's share of the step loss: CE summed / the global batch's targets + aux share."""
    tokens, targets, cu_seqlens = pack(sequences)
    sp = SPContext.single(tokens.shape[1], cu_seqlens.tolist(), device=tokens.device)
    logits, balance = model(tokens, sp, domains_T=domains_T)
    ce = F.cross_entropy(logits[0], targets, ignore_index=IGNORE, reduction="sum") / num_targets
    return ce + balance.share(tokens=num_tokens)  # under no_grad (evaluation) the tracker only observes: 0


def microbatch_plan(groups: list[list[list[int]]], num_ranks: int) -> StepPlan:
    """A plan whose micro-batch j gives rank r the sequences ``groups[j][r]`` (SP degree 1)."""
    microbatches = [MicroBatch([Group((r,), list(ids)) for r, ids in enumerate(micro)]) for micro in groups]
    return StepPlan(
        microbatches=microbatches, num_ranks=num_ranks, predicted_time_s=0.0, solver="bench", solve_time_s=0.0
    )


# -------------------------------------------------------------------------------------------
# Part 1: quality in miniature (single process per run)


def _lr(step: int, setup: dict) -> float:
    warmup, steps, lr = setup["warmup"], setup["steps"], setup["lr"]
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * progress))


def train_run(setup: dict, variant: str, seed: int, save_to: str | None) -> dict:
    torch.set_num_threads(1)  # runs go in parallel jobs, one core each
    start = time.perf_counter()
    data = dataset(setup)
    torch.manual_seed(seed)
    model_cfg, moe_cfg = configs(setup, variant)
    model = build_model(model_cfg, ParallelConfig(device="cpu"), moe_cfg, seed=seed, domain_names=data.domain_names)
    optimizer = torch.optim.AdamW(model.parameters(), lr=setup["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    engine, ctx = LocalEngine(model, optimizer, grad_clip=1.0), ParallelContext.single()
    losses, train_vio = [], []
    for step in range(setup["steps"]):
        for group in optimizer.param_groups:
            group["lr"] = _lr(step, setup)
        batch = data.train_batch(step, seed, setup["batch_seqs"])
        plan = microbatch_plan([[ids] for ids in chunks(list(range(len(batch.sequences))), setup["micro_seqs"])], 1)
        result = train_step(model, engine, ctx, plan, batch)
        losses.append(result.loss + result.aux_loss)
        train_vio.append(result.moe["max_vio"])  # this step's global batch
    result = {"variant": variant, "seed": seed, "train_loss": losses, "train_max_vio": train_vio}
    result.update(evaluate(model, data, setup, k=moe_cfg.top_k // moe_cfg.chain_iterations))
    result["wall_s"] = time.perf_counter() - start
    if save_to:
        torch.save(model.state_dict(), save_to)
    return result


@torch.no_grad()
def evaluate(model, data, setup: dict, *, k: int) -> dict:
    """Validation loss, MaxVio (per micro-batch and per global batch) and per-domain selection
    frequency [site, domain, expert] over ``val_batches`` held-out batches (metrics only)."""
    metrics = model.routing_metrics
    E, D, S = setup["experts"], len(data.domain_names), metrics.num_sites
    domain_counts_SDE, domain_tokens_D = torch.zeros(S, D, E, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    ce_sum = targets = 0.0
    micro_vio, batch_vio, score_sum = [], [], []
    for index in range(setup["val_batches"]):
        batch = data.validation_batch(index, 0, setup["batch_seqs"])
        counts_SE = torch.zeros(S, E, dtype=torch.float64)
        for sequences, domains in zip(
            chunks(batch.sequences, setup["micro_seqs"]), chunks(batch.domains, setup["micro_seqs"])
        ):
            domains_T = torch.repeat_interleave(torch.tensor(domains), torch.tensor([len(s) for s in sequences]))
            ce_sum += float(microbatch_loss(model, sequences, num_tokens=1, num_targets=1, domains_T=domains_T))
            targets += len(domains_T) - len(sequences)
            tokens_D = torch.bincount(domains_T, minlength=D).double()
            summary = metrics.summary()
            micro_vio.append(summary["max_vio"])
            score_sum.append(summary["topk_score_sum"])
            for s, site in enumerate(summary["sites"]):
                counts_SE[s] += torch.tensor(site["tokens_per_expert"], dtype=torch.float64)
                for d, name in enumerate(data.domain_names):
                    if name in site["domain_frequency"]:
                        domain_counts_SDE[s, d] += torch.tensor(site["domain_frequency"][name]) * tokens_D[d]
            domain_tokens_D += tokens_D
        batch_vio.append(statistics.mean(max_violation(c) for c in counts_SE))
    frequency_SDE = domain_counts_SDE / domain_tokens_D.clamp(min=1)[None, :, None]
    return {
        "val_loss": ce_sum / targets,
        "max_vio_global_batch": statistics.mean(batch_vio),
        "max_vio_micro_batch": statistics.mean(micro_vio),
        "topk_score_sum": statistics.mean(score_sum),
        "domain_frequency": frequency_SDE.tolist(),
        "dead_experts": int((domain_counts_SDE.sum(1) == 0).sum()),  # over all sites, whole validation set
        "site_names": metrics.site_names,
        **specialisation(frequency_SDE, k=k),
    }


def specialisation(frequency_SDE: torch.Tensor, *, k: int) -> dict:
    """Mean pairwise Jensen-Shannon divergence (bits) between domains' selection distributions,
    averaged over sites; share of (domain, expert) pairs above 1.5x the uniform frequency k/E."""
    S, D, E = frequency_SDE.shape
    p_SDE = frequency_SDE / k
    jsd = []
    for s in range(S):
        for a in range(D):
            for b in range(a + 1, D):
                p, q = p_SDE[s, a], p_SDE[s, b]
                m = (p + q) / 2
                kl = [(x * (x.clamp(min=1e-12) / m.clamp(min=1e-12)).log2()).sum() for x in (p, q)]
                jsd.append(float(kl[0] + kl[1]) / 2)
    return {
        "specialisation_jsd": statistics.mean(jsd) if jsd else 0.0,
        "hot_pair_share": float((frequency_SDE > 1.5 * k / E).double().mean()),
        "max_domain_frequency": float(frequency_SDE.max()),
    }


def run_quality(setup: dict, seeds: list[int], jobs: int, save_dir: str) -> list[dict]:
    specs = [(v, s) for s in seeds for v in VARIANTS]
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [
            pool.submit(train_run, setup, v, s, os.path.join(save_dir, f"{v}.pt") if s == seeds[0] else None)
            for v, s in specs
        ]
        runs = []
        for future in futures:
            r = future.result()
            runs.append(r)
            line = f"val loss {r['val_loss']:.4f}  JSD {r['specialisation_jsd']:.4f}  ({r['wall_s']:.0f} s)"
            print(f"quality {r['variant']:>11} seed {r['seed']}: {line}", flush=True)
    return runs


def _mean_std(values: list[float]) -> dict:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def verdict(diffs: list[float], lower_is_paper: bool) -> str:
    """Paired differences (variant - baseline) over seeds against the paper's direction."""
    mean = statistics.mean(diffs)
    # fewer than 3 seeds cannot estimate the spread: never call that a reproduction
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 2 else float("inf")
    resolved = abs(mean) > 2 * sem
    if (mean < 0) == lower_is_paper and mean != 0:
        return (
            "reproduces (beyond 2 standard errors over seeds)" if resolved else "paper's direction, within seed noise"
        )
    return "opposite to the paper, beyond 2 standard errors" if resolved else "opposite direction, within seed noise"


def summarise_quality(runs: list[dict]) -> dict:
    keys = ("val_loss", "specialisation_jsd", "hot_pair_share", "max_vio_global_batch", "max_vio_micro_batch")
    per_variant = {
        v: {key: _mean_std([r[key] for r in runs if r["variant"] == v]) for key in (*keys, "topk_score_sum")}
        for v in VARIANTS
    }
    out = {"per_variant": per_variant, "comparisons": {}}
    for name, variant, baseline, claim in COMPARISONS:
        seeds = sorted({r["seed"] for r in runs})
        pick = {(r["variant"], r["seed"]): r for r in runs}
        entry = {"paper": claim}
        for key in keys:
            entry[f"{key}_diff"] = _mean_std(_paired(pick, seeds, variant, baseline, key))
        entry["val_loss_verdict"] = verdict(_paired(pick, seeds, variant, baseline, "val_loss"), True)
        if name == "global_vs_micro":
            jsd = _paired(pick, seeds, variant, baseline, "specialisation_jsd")
            entry["specialisation_verdict"] = verdict(jsd, False)
        out["comparisons"][name] = entry
    return out


def _paired(pick: dict, seeds: list[int], variant: str, baseline: str, key: str) -> list[float]:
    return [pick[variant, s][key] - pick[baseline, s][key] for s in seeds]


# -------------------------------------------------------------------------------------------
# Part 2: step-time overhead with expert parallelism over gloo


def uneven_shares(num_sequences: int, world: int, ga: int) -> list[int]:
    """Sequences per rank in proportion 1:2:...:W, each at least ``ga`` (one per micro-batch)."""
    weights = [r + 1 for r in range(world)]
    shares = [max(ga, round(num_sequences * w / sum(weights))) for w in weights]
    shares[-1] += num_sequences - sum(shares)
    if shares[-1] < ga:
        raise ValueError(f"{num_sequences} sequences cannot give {world} ranks {ga} micro-batches each")
    return shares


def load_sharded(model, full_state: dict) -> None:
    """Load a single-process (ep_size=1) state dict into this EP rank's model: local expert j
    of layer l is global expert ``global_expert_ids()[j]``."""
    pattern = re.compile(r"(blocks\.(\d+)\.ffn\.deepspeed_moe\.experts\.deepspeed_experts\.)(\d+)(\..*)")
    state = {}
    for name in model.state_dict():
        match = pattern.fullmatch(name)
        if match:
            ids = model.blocks[int(match[2])].ffn.global_expert_ids()
            name_full = f"{match[1]}{ids[int(match[3])]}{match[4]}"
        else:
            name_full = name
        state[name] = full_state[name_full]
    model.load_state_dict(state)


def _one_step(ctx, model, plan: StepPlan, batch) -> tuple[float, float, dict]:
    """Forward + backward of every micro-batch (runtime/step.py ``run_plan``), no optimizer."""
    dist.barrier(group=ctx.world)
    with comm.CommMeter() as meter:
        wall, cpu = time.perf_counter(), time.process_time()
        model.tracker.begin_step()
        run_plan(model, ctx, plan, batch.sequences, batch.domains, backward=lambda loss, last: loss.backward())
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    model.zero_grad(set_to_none=True)
    model.routing_metrics.reset()
    return wall, cpu, meter.summary()


def _time_variants(ctx, models: dict, batches: list, shares: list[int], ga: int, repeats: int) -> dict:
    W, rank = ctx.world_size, ctx.rank
    firsts = [sum(shares[:r]) for r in range(W)]
    # every rank runs the same number of micro-batches, each on its own uneven share
    per_rank = [split_even(list(range(first, first + n)), ga) for first, n in zip(firsts, shares)]
    plan = microbatch_plan([[per_rank[r][j] for r in range(W)] for j in range(ga)], W)
    steps = [(plan, batch) for batch in batches]
    samples = {name: {"wall_s": [], "cpu_s": []} for name in models}
    volume = {}
    for model in models.values():  # warm-up (gloo connections, allocator)
        _one_step(ctx, model, *steps[0])
    names = list(models)
    for r in range(repeats):
        # interleaved, and the order rotates so that no variant always follows the same one
        for name in names[r % len(names) :] + names[: r % len(names)]:
            wall, cpu, volume[name] = _one_step(ctx, models[name], *steps[1 + r % (len(steps) - 1)])
            both = torch.zeros(W, 2, dtype=torch.float64)
            both[rank] = torch.tensor([wall, cpu])
            dist.all_reduce(both, group=ctx.world)
            samples[name]["wall_s"].append(float(both[:, 0].max()))
            samples[name]["cpu_s"].append(float(both[:, 1].sum()))
    per_rank: list[dict] = [None] * W
    dist.all_gather_object(per_rank, volume, group=ctx.world)
    return {name: {**samples[name], "comm_by_rank": [v[name] for v in per_rank]} for name in models}


def _overhead_worker(rank: int, world: int, store: str, job: dict, queue) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # W ranks share the machine's cores
    from moe.layer import expert_parallel_group

    ctx = ParallelContext.initialize(backend="gloo", device="cpu", init_method=f"file://{store}")
    setup, rows = job["setup"], []
    for ep_size in job["ep_sizes"]:
        ep_group = expert_parallel_group(ep_size)
        for weights in job["weights"]:
            models = {}
            for variant in VARIANTS:
                torch.manual_seed(0)
                model_cfg, moe_cfg = configs(setup, variant, ep_size)
                model = build_model(model_cfg, ParallelConfig(device="cpu"), moe_cfg, balance_group=ctx.world,
                                    ep_group=ep_group, seed=0)  # fmt: skip
                if weights == "trained":
                    load_sharded(model, torch.load(os.path.join(job["weights_dir"], f"{variant}.pt")))
                models[variant] = model
            timed = _time_variants(ctx, models, job["batches"], job["shares"], job["ga"], job["repeats"])
            for variant, entry in timed.items():
                rows.append({"ep_size": ep_size, "weights": weights, "variant": variant, **entry})
                if rank == 0:
                    print(f"overhead ep={ep_size} {weights:>7} {variant:>11}: "
                          f"{statistics.median(entry['wall_s']) * 1e3:8.1f} ms", flush=True)  # fmt: skip
    if rank == 0:
        queue.put(rows)
    ctx.destroy()


def run_overhead(job: dict, world: int) -> list[dict]:
    return spawn_ranks(world, _overhead_worker, job)


def _bytes(comm_by_rank: list[dict], kind: str, field: str = "bytes_sent") -> list[int]:
    return [c.get(kind, {}).get(field, 0) for c in comm_by_rank]


def summarise_overhead(rows: list[dict]) -> tuple[list[dict], dict]:
    table, summary = [], {}
    for row in rows:
        a2a_recv = _bytes(row["comm_by_rank"], "all_to_all", "bytes_received")
        table.append({
            "ep_size": row["ep_size"],
            "weights": row["weights"],
            "variant": row["variant"],
            "median_wall_s": statistics.median(row["wall_s"]),
            "median_cpu_s_all_ranks": statistics.median(row["cpu_s"]),
            "all_reduce_bytes_max_rank": max(_bytes(row["comm_by_rank"], "all_reduce")),
            "all_reduce_calls": max(_bytes(row["comm_by_rank"], "all_reduce", "calls")),
            "all_to_all_bytes_max_rank": max(_bytes(row["comm_by_rank"], "all_to_all")),
            "all_to_all_calls": max(_bytes(row["comm_by_rank"], "all_to_all", "calls")),
            "all_to_all_recv_max_over_mean": max(a2a_recv) / max(1e-9, statistics.mean(a2a_recv)),
        })  # fmt: skip
    ratios = {}  # per-repeat ratios: variants interleaved repeat by repeat share the machine's state
    for ep_size, weights in sorted({(r["ep_size"], r["weights"]) for r in rows}):
        pick = {r["variant"]: r for r in rows if r["ep_size"] == ep_size and r["weights"] == weights}
        for name, variant, baseline, _ in COMPARISONS:
            for kind in ("wall_s", "cpu_s"):
                per_repeat = [a / b for a, b in zip(pick[variant][kind], pick[baseline][kind])]
                ratios.setdefault((f"ep={ep_size},{weights}", name, kind), []).extend(per_repeat)
                ratios.setdefault(("pooled", name, kind), []).extend(per_repeat)
    for (key, name, kind), values in ratios.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        entry = summary.setdefault(key, {}).setdefault(name, {"paper": PAPER_OVERHEAD[name]})
        entry[f"{kind[:-2]}_overhead_pct"] = 100 * (statistics.median(values) - 1)
        entry[f"{kind[:-2]}_overhead_pct_iqr"] = [100 * (q1 - 1), 100 * (q3 - 1)]
    return table, summary


# -------------------------------------------------------------------------------------------
# Plots and main


def plot(table: list[dict], runs: list[dict], setup: dict, out_dir: Path, domain_names: tuple) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(VARIANTS)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    configs_ = sorted({(r["ep_size"], r["weights"]) for r in table})
    width = 0.8 / max(1, len(names))
    for i, variant in enumerate(names):
        heights = [next(r for r in table if (r["ep_size"], r["weights"]) == c and r["variant"] == variant)
                   for c in configs_]  # fmt: skip
        xs = [j + i * width for j in range(len(configs_))]
        axes[0].bar(xs, [h["median_wall_s"] * 1e3 for h in heights], width, label=variant)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(configs_))], [f"EP={e}\n{w}" for e, w in configs_])
    axes[0].set_ylabel("step time, ms (slowest rank, median)")
    axes[0].set_title("fwd+bwd+aux step over gloo")
    for variant in names:
        curves = torch.tensor([r["train_loss"] for r in runs if r["variant"] == variant])
        mean = curves.mean(0)
        smooth = [float(mean[max(0, i - 9) : i + 1].mean()) for i in range(len(mean))]
        axes[1].plot(smooth, label=variant)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("train loss (mean over seeds, 10-step avg)")
    axes[1].set_title("training")
    vals = [[r["val_loss"] for r in runs if r["variant"] == v] for v in names]
    axes[2].bar(names, [statistics.mean(v) for v in vals],
                yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=4)  # fmt: skip
    low = min(min(v) for v in vals)
    axes[2].set_ylim(low - 0.05 * abs(low), max(max(v) for v in vals) + 0.02 * abs(low))
    axes[2].set_ylabel("validation loss (nats/byte), mean ± std")
    axes[2].set_title(f"validation, {len(vals[0])} seeds")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "moe.png", dpi=110)
    plt.close(fig)

    seed0 = min(r["seed"] for r in runs)
    pair = [next(r for r in runs if r["variant"] == v and r["seed"] == seed0) for v in ("micro", "global")]
    S = len(pair[0]["site_names"])
    fig, axes = plt.subplots(S, 2, figsize=(13, 1.1 * S + 1.2), squeeze=False, sharex=True)
    fig.subplots_adjust(hspace=0.6)
    vmax = max(float(torch.tensor(r["domain_frequency"]).max()) for r in pair)
    for col, run in enumerate(pair):
        for s in range(S):
            ax = axes[s][col]
            image = ax.imshow(torch.tensor(run["domain_frequency"][s]), vmin=0, vmax=vmax, aspect="auto")
            ax.set_title(f"{run['variant']} LBL, {run['site_names'][s]}", fontsize=8)
            ax.set_yticks(range(len(domain_names)), domain_names, fontsize=7)
        axes[-1][col].set_xlabel(f"expert (seed {seed0}, validation batches)")
    uniform = setup["top_k"] / setup["experts"]
    fig.colorbar(image, ax=axes, label=f"selection frequency (uniform k/E = {uniform:.2f})")
    fig.savefig(out_dir / "moe_domains.png", dpi=110)
    plt.close(fig)


def build_setup(args) -> dict:
    # micro_seqs=1: micro LBL balances each sequence alone; global balances the step's batch_seqs
    setup = {"layers": 4, "d_model": 64, "experts": 16, "top_k": 4, "expert_hidden": 64, "router_dim": 32,
             "balance_coef": 0.01, "seq_len": 256, "batch_seqs": 8, "micro_seqs": 1, "lr": 3e-3,
             "steps": 40 if args.quick else 300, "warmup": 5 if args.quick else 20,
             "val_batches": 4 if args.quick else 16}  # fmt: skip
    for key in ("steps", "seq_len", "val_batches"):
        if getattr(args, key) is not None:
            setup[key] = getattr(args, key)
    setup["warmup"] = min(setup["warmup"], setup["steps"])
    return setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 seeds x 40 steps, EP=4 only, 4 repeats")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--seeds", type=int, help="number of seeds (quick: 2, full: 3)")
    parser.add_argument("--steps", type=int, help="training steps per quality run")
    parser.add_argument("--seq-len", type=int, help="max tokens per sequence (longer documents are split)")
    parser.add_argument("--val-batches", type=int)
    parser.add_argument("--jobs", type=int, default=2, help="quality runs in parallel (one core each)")
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--ep-sizes", type=int, nargs="+", help="expert-parallel sizes (quick: 4, full: 4 2)")
    parser.add_argument("--repeats", type=int, help="timed steps per variant (quick: 4, full: 12)")
    parser.add_argument("--ga", type=int, default=2, help="micro-batches per timed step on every rank")
    args = parser.parse_args()
    setup = build_setup(args)
    seeds = list(range(args.seeds or (2 if args.quick else 3)))
    ep_sizes = args.ep_sizes or ([args.world_size] if args.quick else [args.world_size, args.world_size // 2])
    ep_sizes = [e for e in ep_sizes if e >= 1]
    repeats = args.repeats or (4 if args.quick else 12)
    for e in ep_sizes:
        if args.world_size % e or setup["experts"] % e:
            parser.error(f"ep size {e} must divide --world-size {args.world_size} and {setup['experts']} experts")
    start, load_start = time.perf_counter(), os.getloadavg()
    data = dataset(setup)
    overhead_batch = 2 * args.world_size * args.ga
    shares = uneven_shares(overhead_batch, args.world_size, args.ga)
    with tempfile.TemporaryDirectory() as weights_dir:
        runs = run_quality(setup, seeds, args.jobs, weights_dir)
        quality_s = time.perf_counter() - start
        job = {
            "setup": setup,
            "ep_sizes": ep_sizes,
            "weights": ["init", "trained"],
            "weights_dir": weights_dir,
            "batches": [data.train_batch(10_000 + r, 0, overhead_batch) for r in range(min(repeats, 8) + 1)],
            "shares": shares,
            "ga": args.ga,
            "repeats": repeats,
        }
        rows = run_overhead(job, args.world_size)
    table, overhead_summary = summarise_overhead(rows)
    quality = summarise_quality(runs)
    config = {
        **setup,
        "variants": VARIANTS,
        "seeds": seeds,
        "model": "hybrid LLLS, 4 heads (2 KV), tied byte embeddings, MoE FFN (SwiGLU experts) in every layer",
        "optimizer": "AdamW(0.9, 0.95), weight decay 0.1, clip 1.0, warmup + cosine to lr/10",
        "data": "embedded mixed-domain corpus; validation batches 0..val_batches-1, seed 0",
        "overhead": {"world_size": args.world_size, "ep_sizes": ep_sizes, "repeats": repeats, "ga": args.ga,
                     "sequences_per_step": overhead_batch, "sequences_per_rank": shares, "dtype": "float32"},
        "quick": args.quick,
    }  # fmt: skip
    payload = {
        "machine": machine_info(),
        "config": config,
        "summary": {"overhead": overhead_summary, "quality": quality},
        "overhead": table,
        "overhead_samples": rows,
        "runs": runs,
        "runtime_s": {"quality": quality_s, "total": time.perf_counter() - start},
        # other work on the machine shows up as noise in the timings
        "load_average_1_5_15min": {"start": load_start, "end": os.getloadavg()},
    }
    path = write_json("moe", payload, args.out_dir)
    plot(table, runs, setup, args.out_dir, data.domain_names)
    for key, entry in overhead_summary.items():
        for name, value in entry.items():
            wall, cpu = value["wall_overhead_pct"], value["cpu_overhead_pct"]
            print(f"{key:>18} {name:>16}: wall {wall:+6.1f}%  cpu {cpu:+6.1f}%")
    for name, entry in quality["comparisons"].items():
        diff = entry["val_loss_diff"]
        print(f"{name:>16}: val loss diff {diff['mean']:+.4f} ± {diff['std']:.4f} -> {entry['val_loss_verdict']}")
        if "specialisation_verdict" in entry:
            jsd = entry["specialisation_jsd_diff"]
            print(f"{'':>16}  JSD diff {jsd['mean']:+.4f} ± {jsd['std']:.4f} -> {entry['specialisation_verdict']}")
    print(f"wrote {path}, moe.png and moe_domains.png in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
