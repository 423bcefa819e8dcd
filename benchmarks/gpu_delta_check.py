"""GPU check of the gated delta rule: fla's ``chunk_gated_delta_rule`` vs the pure-torch chunk
kernel (parallel/delta_rule.py), bf16 accuracy and forward + backward throughput.

    python benchmarks/gpu_delta_check.py [--out-dir DIR] [--device cuda] [--lengths 4096 16384]

Accuracy: relative RMS error ||x - ref|| / ||ref|| of o and of every gradient (q, k, v, beta,
log-decay) for the bf16 torch path and the bf16 fla path, against the fp32 torch kernel on the
same inputs (L2-normalised k, beta = sigmoid, per-token gate g = logsigmoid), with and without
packed documents. Throughput: forward + backward wall time, torch vs fla, same inputs. The JSON
(machine with the device name, versions) is rewritten after every measurement, so a run cut
short keeps what it measured. Without fla (or on ``--device cpu``, a smoke run) only the torch
rows are measured and ``fla_available`` is false.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, machine_info, time_fn, write_json  # noqa: E402
from parallel.delta_rule import chunk_delta_rule, fla_delta_available  # noqa: E402

NAMES = ["o", "dq", "dk", "dv", "dbeta", "dg"]


def make(T: int, H: int, D: int, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, T, H, D, device=device, generator=g) / D**0.5
    k = F.normalize(torch.randn(1, T, H, D, device=device, generator=g), dim=-1)
    v = torch.randn(1, T, H, D, device=device, generator=g)
    beta = torch.sigmoid(torch.randn(1, T, H, device=device, generator=g))
    gate = F.logsigmoid(torch.randn(1, T, H, device=device, generator=g) + 3)
    do = torch.randn(1, T, H, D, device=device, generator=g)
    return q, k, v, beta, gate, do


def run(backend: str, dtype, inputs, cu_seqlens):
    q, k, v, beta, gate, do = inputs
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, beta)]
    g = gate.detach().clone().requires_grad_()  # gates stay fp32 (fla takes fp32 g)
    o, _ = chunk_delta_rule(*leaves, log_decay=g, cu_seqlens=cu_seqlens, backend=backend)
    o.float().backward(do)
    return [o.detach()] + [x.grad for x in leaves] + [g.grad]


def rel_rms(x, ref) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/seqmoe-gpu-delta"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.out_dir.resolve() == RESULTS_DIR.resolve():
        print("writing into the committed benchmarks/results/ as asked", flush=True)
    on_gpu = args.device.startswith("cuda")
    backends = ["torch"] + (["fla"] if on_gpu and fla_delta_available() else [])
    low = torch.bfloat16 if on_gpu else torch.float32
    result = {
        "machine": machine_info(),
        "config": {"heads": args.heads, "head_dim": args.head_dim, "dtype": str(low), "device": args.device},
        "fla_available": "fla" in backends,
        "accuracy": [],
        "throughput": [],
    }
    H, D = args.heads, args.head_dim
    for docs in (False, True):
        T = 2048
        cu = torch.tensor([0, 300, 301, 1500, T], device=args.device) if docs else None
        inputs = make(T, H, D, args.device)
        ref = run("torch", torch.float32, inputs, cu)
        for backend in backends:
            got = run(backend, low, inputs, cu)
            errs = dict(zip(NAMES, (rel_rms(x, y) for x, y in zip(got, ref))))
            result["accuracy"].append({"documents": docs, "backend": backend, "rel_rms": errs})
            print(f"accuracy documents={docs} {backend:>5} {low} vs torch fp32: {errs}", flush=True)
            write_json("gpu_delta_check", result, args.out_dir)
    for T in args.lengths:
        inputs = make(T, H, D, args.device)
        for backend in backends:
            timing = time_fn(functools.partial(run, backend, low, inputs, None), repeats=args.repeats, cuda=on_gpu)
            row = {"backend": backend, "T": T, **timing, "tokens_per_s": T / timing["median_s"]}
            result["throughput"].append(row)
            print(f"T={T:>6} fwd+bwd {backend:>5}: {timing['median_s'] * 1e3:8.2f} ms", flush=True)
            write_json("gpu_delta_check", result, args.out_dir)


if __name__ == "__main__":
    main()
