"""The GPU measurements of issue 13, one prepared script, JSON written after every stage.

    python benchmarks/gpu_kernels.py [--out-dir DIR] [--stages S ...] [--dry]

Stages (each records its own error and the next one still runs):

1. ``softmax``: packed causal softmax attention, fwd + bwd, bf16, H=16 / H_kv=8 / d=128 (the
   1B preset's softmax layer), at 8K and 32K packed tokens with documents of 256 or of
   log-uniform 64-2,048 tokens: flash-attn varlen, flex_attention, per-document SDPA, the dense
   window mask and the documents one by one; accuracy of each against an fp32 reference.
2. ``linear``: fla vs the pure-torch linear-attention kernel, bf16 accuracy and throughput
   (``benchmarks/gpu_kernel_check.measure``).
3. ``experts``: one MoE layer of the 1B preset (d=2048, expert hidden 768, 8 experts, top-2),
   looped vs grouped experts, tokens/s.
4. ``train``: one training step (forward, backward, AdamW) of the 1B-class hybrid MoE preset
   (planner/presets.py HYBRID_1B: 24 layers LLLS, d=2048) at 8K and 32K tokens on one GPU:
   tokens/s, achieved TFLOP/s and MFU, FLOPs counted as the cost model counts them
   (``flops_cost_model``: lin·tokens + quad·Σ document²), and a profiler breakdown of the step
   by kernel class (what limits it).

``--dry`` runs every stage top to bottom on CPU at tiny sizes (fp32, a 2-layer model), skipping
what needs CUDA (fla, flash-attn, flex): the script's plumbing is tested without a GPU.
Default out-dir runs/bench (not the committed benchmarks/results/).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, time_fn, write_json  # noqa: E402
from benchmarks.kernels import doc_lengths  # noqa: E402
from moe import MoELayer  # noqa: E402
from parallel.doc_attention import select_backend  # noqa: E402
from parallel.softmax_sp import packed_attention  # noqa: E402
from planner.presets import HYBRID_1B, HybridShape, flops_cost_model  # noqa: E402

STAGES = ("softmax", "linear", "experts", "train")
# dense BF16 tensor-core peaks (no sparsity), for MFU
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H20": 148e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}
TINY = HybridShape(
    num_layers=2,
    layer_pattern="LS",
    d_model=64,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=256,
    ffn_hidden=64,
    num_experts=4,
    top_k=2,
    ep_size=1,
)


def versions() -> dict:
    out = {}
    for dist in ("torch", "triton", "flash-attn", "flash-linear-attention", "fla-core", "deepspeed"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _bounds(lengths: list[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


# ----------------------------------------------------------------------------- stage 1: softmax


def softmax_stage(result: dict, write, *, device, dtype, sizes, heads, repeats) -> None:
    H, K, D = heads
    rows = result.setdefault("softmax", [])
    for N in sizes:
        for dist in ("uniform256", "mixed"):
            bounds = _bounds(doc_lengths(dist, N))
            g = torch.Generator(device=device).manual_seed(N)
            q = torch.randn(1, N, H, D, device=device, generator=g).to(dtype)
            k = torch.randn(1, N, K, D, device=device, generator=g).to(dtype)
            v = torch.randn(1, N, K, D, device=device, generator=g).to(dtype)
            do = torch.randn(1, N, H, D, device=device, generator=g).to(dtype)
            ref = _attention_grads("sdpa", q.float(), k.float(), v.float(), do.float(), bounds)
            methods = ["flash", "flex", "sdpa", "dense", "one_by_one"]
            for method in methods:
                row = {"tokens": N, "docs": dist, "num_docs": len(bounds) - 1, "method": method}
                if method in ("flash", "flex"):
                    try:
                        select_backend(q, v, method)
                    except ValueError as exc:
                        rows.append({**row, "skipped": str(exc)})
                        continue
                if method == "dense" and N > 16384 and device.type == "cpu":
                    rows.append({**row, "skipped": "dense mask above 16K tokens on CPU"})
                    continue
                try:
                    got = _attention_grads(method, q, k, v, do, bounds)
                    row["rel_rms"] = dict(zip(("o", "dq", "dk", "dv"), (rel_rms(a, b) for a, b in zip(got, ref))))
                    timing = time_fn(
                        lambda m=method, args=(q, k, v, do, bounds): _attention_grads(m, *args),
                        repeats=repeats,
                        cuda=device.type == "cuda",
                    )
                    row.update(timing, tokens_per_s=N / timing["median_s"])
                except Exception as exc:  # e.g. out of memory for the dense mask: record and go on
                    row["error"] = f"{type(exc).__name__}: {exc}"[:500]
                rows.append(row)
                print(f"softmax N={N} {dist} {method}: {_short(row)}", flush=True)
                write()
    for N in sizes:
        for dist in ("uniform256", "mixed"):
            mine = {r["method"]: r for r in rows if r["tokens"] == N and r["docs"] == dist and "median_s" in r}
            if "one_by_one" in mine:
                base = mine["one_by_one"]["median_s"]
                for r in mine.values():
                    r["ratio_to_one_by_one"] = r["median_s"] / base
    write()


def _attention_grads(method, q, k, v, do, bounds):
    if method == "one_by_one":
        return _one_by_one(q, k, v, do, bounds)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    o = packed_attention(*leaves, q_offset=0, causal=True, bounds=bounds, scale=scale, method=method)
    o.backward(do)
    return [o.detach()] + [t.grad for t in leaves]


def _one_by_one(q, k, v, do, bounds):
    """Each document by its own SDPA call on leaves of its own (slicing one packed leaf would add
    an O(N) gradient buffer per document); outputs and gradients concatenated afterwards."""
    results = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        leaves = [t[:, a:b].transpose(1, 2).detach().requires_grad_() for t in (q, k, v)]
        gqa = leaves[0].shape[1] != leaves[1].shape[1]
        o = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=gqa)
        o.backward(do[:, a:b].transpose(1, 2))
        results.append([o.detach()] + [t.grad for t in leaves])
    return [torch.cat(parts, dim=2).transpose(1, 2) for parts in zip(*results)]


def _short(row: dict) -> str:
    if "median_s" in row:
        return f"{row['median_s'] * 1e3:.2f} ms, rel_rms o={row['rel_rms']['o']:.1e} dq={row['rel_rms']['dq']:.1e}"
    return row.get("error") or row.get("skipped", "")


# ----------------------------------------------------------------------------- stage 2: linear


def linear_stage(result: dict, write, *, device) -> None:
    if device.type != "cuda":
        result["linear"] = {"skipped": "fla runs on CUDA only"}
        write()
        return
    from benchmarks.gpu_kernel_check import measure
    from parallel.fla_backend import fla_available

    result["linear"] = section = {"fla_available": fla_available()}
    if not fla_available():
        section["note"] = "fla not installed: torch kernel only"
    measure(section, write) if fla_available() else write()


# ----------------------------------------------------------------------------- stage 3: experts


def experts_stage(result: dict, write, *, device, dtype, shape: HybridShape, tokens: int, repeats: int) -> None:
    torch.manual_seed(0)
    x = torch.randn(tokens, shape.d_model, device=device, dtype=dtype, requires_grad=True)
    layers = {}
    for compute in ("loop", "grouped"):
        layers[compute] = MoELayer(
            shape.d_model,
            shape.ffn_hidden,
            num_experts=shape.num_experts,
            top_k=shape.top_k,
            router="linear",
            balance_coef=0.0,
            expert_compute=compute,
        ).to(device=device, dtype=dtype)
    layers["grouped"].load_state_dict(layers["loop"].state_dict())
    rows = result.setdefault("experts", [])

    def step(layer):
        y, _ = layer(x)
        y.backward(torch.ones_like(y))
        return y

    y_loop, y_grp = step(layers["loop"]).detach(), step(layers["grouped"]).detach()
    for compute, layer in layers.items():
        timing = time_fn(lambda layer=layer: step(layer), repeats=repeats, cuda=device.type == "cuda")
        rows.append(
            {
                "compute": compute,
                "tokens": tokens,
                "d_model": shape.d_model,
                "hidden": shape.ffn_hidden,
                "experts": shape.num_experts,
                **timing,
                "tokens_per_s": tokens / timing["median_s"],
                "rel_rms_vs_loop": rel_rms(y_grp if compute == "grouped" else y_loop, y_loop),
            }
        )
        print(f"experts {compute}: {tokens / timing['median_s']:.0f} tokens/s", flush=True)
        write()


# ----------------------------------------------------------------------------- stage 4: train step


def counted_flops(shape: HybridShape, lengths: list[int]) -> float:
    """FLOPs of one fwd + bwd as the planner's cost model counts them: with ``flops_per_s`` = 1e3
    (1 FLOP per ms), ``lin_ms`` is FLOPs per token and ``quad_ms`` FLOPs per document²."""
    model = flops_cost_model(
        shape,
        name="flop-count",
        flops_per_s=1e3,
        beta_ms=0.0,
        memory_budget_gb=1e9,
        world_size=1,
        zero_stage=0,
        bandwidth_gbps={2: 1.0},
        ep_bandwidth_gbps=1.0,
        notes="",
    )
    return model.lin_ms * sum(lengths) + model.quad_ms * sum(n * n for n in lengths)


def _build(shape: HybridShape, device, dtype, checkpointing: bool):
    from runtime.config import ModelConfig, MoEConfig, ParallelConfig
    from runtime.model import build_model

    config = ModelConfig(
        layer_pattern=shape.layer_pattern,
        num_layers=shape.num_layers,
        d_model=shape.d_model,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_kv_heads,
        ffn_hidden=shape.ffn_hidden,
        vocab_size=shape.vocab_size,
        tie_embeddings=False,
        activation_checkpointing=checkpointing,
    )
    moe = MoEConfig(num_experts=shape.num_experts, top_k=shape.top_k, ep_size=1)
    model = build_model(config, ParallelConfig(device=str(device)), moe).to(device=device, dtype=dtype)
    return model


def _train_step(model, optimizer, tokens, batch):
    if model.tracker is not None:
        model.tracker.begin_step()  # the balance GA buffer belongs to the step
    logits, balance = model(tokens[:, :-1], batch)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens[0, 1:]) + balance.value()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def train_stage(result: dict, write, *, device, dtype, shape, sizes, repeats, profile: bool) -> None:
    from parallel.sp_context import SPContext

    rows = result.setdefault("train", [])
    peak = peak_flops(device)
    for N in sizes:
        lengths = doc_lengths("mixed", N)
        row = {"tokens": N, "num_docs": len(lengths), "layers": shape.num_layers, "d_model": shape.d_model}
        for checkpointing in (False, True):
            model = optimizer = None
            try:
                torch.manual_seed(0)
                model = _build(shape, device, dtype, checkpointing)
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                tokens = torch.randint(0, shape.vocab_size, (1, N + 1), device=device)
                batch = SPContext.single(N, _bounds(lengths), device=device)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                timing = time_fn(
                    lambda m=model, o=optimizer, b=batch, t=tokens: _train_step(m, o, t, b),
                    warmup=1,
                    repeats=repeats,
                    cuda=device.type == "cuda",
                )
                flops = counted_flops(shape, lengths)
                row.update(
                    activation_checkpointing=checkpointing,
                    **timing,
                    tokens_per_s=N / timing["median_s"],
                    counted_flops=flops,
                    achieved_tflops=flops / timing["median_s"] / 1e12,
                    mfu=None if peak is None else flops / timing["median_s"] / peak,
                    peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                )
                if profile:
                    row["profile"] = profile_step(model, optimizer, tokens, batch, device)
                break
            except torch.OutOfMemoryError as exc:
                row[f"oom_checkpointing_{checkpointing}"] = str(exc)[:300]
            finally:
                del model, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        rows.append(row)
        mfu = row.get("mfu")
        print(
            f"train N={N}: {row.get('tokens_per_s', float('nan')):.0f} tokens/s, "
            f"{row.get('achieved_tflops', float('nan')):.1f} TFLOP/s, MFU {mfu if mfu is None else round(mfu, 3)}",
            flush=True,
        )
        write()


KERNEL_CLASSES = (
    ("softmax attention", ("flash", "attention", "sdpa", "fmha", "flex")),
    ("linear attention", ("chunk", "gla", "fla", "cumsum", "linear_attention")),
    ("grouped / expert GEMM", ("grouped", "bmm")),
    ("GEMM", ("gemm", "mm", "matmul", "cutlass", "sm90_xmma", "nvjet")),
    ("MoE dispatch / gather / scatter", ("index", "scatter", "gather", "sort", "bincount", "all_to_all")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
    ("elementwise / norm", ("elementwise", "vectorized", "reduce", "norm", "silu", "softmax", "mul", "add", "copy")),
)


def kernel_class(name: str) -> str:
    lower = name.lower()
    for label, keys in KERNEL_CLASSES:
        if any(key in lower for key in keys):
            return label
    return "other"


def profile_step(model, optimizer, tokens, batch, device) -> dict:
    """Self device (or CPU) time per kernel class over one step, and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        _train_step(model, optimizer, tokens, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0.0) / 1e3, e.count) for e in prof.key_averages()]
    if device.type == "cuda":  # device kernels only, not the CPU-side aten ops that launched them
        events = [e for e in events if e[1] > 0]
    total = sum(t for _, t, _ in events) or 1.0
    classes: dict[str, float] = {}
    for name, ms, _ in events:
        classes[kernel_class(name)] = classes.get(kernel_class(name), 0.0) + ms
    top = sorted(events, key=lambda e: -e[1])[:20]
    return {
        "time_attribute": attr,
        "total_ms": total,
        "by_class_ms": dict(sorted(classes.items(), key=lambda kv: -kv[1])),
        "by_class_share": {k: v / total for k, v in classes.items()},
        "top_kernels": [{"name": n[:160], "ms": ms, "calls": c} for n, ms, c in top],
    }


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--dry", action="store_true", help="CPU, tiny sizes, CUDA-only stages skipped")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.dry
    if not cuda and not args.dry:
        parser.error("no CUDA device: run with --dry for the CPU plumbing check")
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    sizes = [8192, 32768] if cuda else [512]
    shape = HYBRID_1B if cuda else TINY
    repeats = args.repeats if cuda else 1
    result = {
        "machine": machine_info(),
        "versions": versions(),
        "config": {"dry": args.dry, "device": str(device), "dtype": str(dtype), "sizes": sizes, "stages": args.stages},
        "stage_status": {},
    }
    out_name = "gpu_kernels_dry" if args.dry else "gpu_kernels"

    def write() -> None:
        write_json(out_name, result, args.out_dir)

    stages = {
        "softmax": lambda: softmax_stage(
            result,
            write,
            device=device,
            dtype=dtype,
            sizes=sizes,
            heads=(16, 8, 128) if cuda else (4, 2, 16),
            repeats=repeats,
        ),
        "linear": lambda: linear_stage(result, write, device=device),
        "experts": lambda: experts_stage(
            result, write, device=device, dtype=dtype, shape=shape, tokens=8192 if cuda else 128, repeats=repeats
        ),
        "train": lambda: train_stage(
            result, write, device=device, dtype=dtype, shape=shape, sizes=sizes, repeats=repeats, profile=True
        ),
    }
    for name in args.stages:
        start = time.perf_counter()
        try:
            stages[name]()
            result["stage_status"][name] = {"ok": True}
        except Exception as exc:  # one stage's failure must not lose the others' figures
            traceback.print_exc()
            result["stage_status"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:1000]}
        result["stage_status"][name]["seconds"] = round(time.perf_counter() - start, 2)
        write()
        print(f"stage {name}: {result['stage_status'][name]}", flush=True)
    failed = [n for n, s in result["stage_status"].items() if not s["ok"]]
    print(f"wrote {args.out_dir / (out_name + '.json')}" + (f"; failed stages: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
