"""GPU check of the fla backend against the pure-torch kernel (bf16 accuracy and throughput).

    python benchmarks/gpu_kernel_check.py [--out-dir DIR]

Accuracy: relative RMS error ||x - ref|| / ||ref|| of the bf16 fla path (and of the bf16 torch
path, for scale) against the fp32 pure-torch kernel on the same inputs; target <= 3e-3.
Throughput: forward (+ backward where fla allows it) wall time, torch vs fla, same inputs.
fla refuses the backward of per-token gates on Hopper with Triton in [3.4, 3.7.1) (a
miscompile, fla issue #640), so gated cases are measured forward-only there. Results are written
after every step, so a run cut short still leaves what it measured.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, time_fn, write_json  # noqa: E402
from parallel.fla_backend import fla_gated_backward_ok  # noqa: E402
from parallel.linear_attention import chunk_linear_attention  # noqa: E402

B, H, D = 1, 16, 128


def make(T, decay, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = (torch.randn(B, T, H, D, device="cuda", generator=g) / D**0.5).bfloat16()
    k = (torch.randn(B, T, H, D, device="cuda", generator=g) / D**0.5).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
    if decay == "token":
        a = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 3)
    else:  # a fixed (frozen) per-head decay
        a = -torch.linspace(0.005, 0.1, H, device="cuda")
    return q, k, v, a


def run(backend, q, k, v, a, do, backward):
    leaves = [x.detach().clone().requires_grad_(backward) for x in (q, k, v)]
    o, _ = chunk_linear_attention(*leaves, log_decay=a, backend=backend)
    if not backward:
        return [o.detach()]
    o.float().backward(do)
    return [o.detach()] + [x.grad for x in leaves]


def rel_rms(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def measure(result: dict, write, *, accuracy_T: int = 2048, lengths: tuple[int, ...] = (4096, 16384, 65536)) -> None:
    """Append fla-vs-torch accuracy and throughput rows to ``result`` (calling ``write()`` after each)."""
    result.setdefault("fla_gated_backward_ok", fla_gated_backward_ok())
    result.setdefault("accuracy", [])
    result.setdefault("throughput", [])
    cases = [("head", True), ("token", fla_gated_backward_ok())]
    for decay, backward in cases:
        q, k, v, a = make(accuracy_T, decay)
        do = torch.randn(B, accuracy_T, H, D, device="cuda")
        ref = run("torch", q.float(), k.float(), v.float(), a, do, backward)
        for backend in ("torch", "fla"):
            got = run(backend, q, k, v, a, do, backward)
            errs = dict(zip(["o", "dq", "dk", "dv"], (rel_rms(x, y) for x, y in zip(got, ref))))
            result["accuracy"].append({"decay": decay, "backward": backward, "backend": backend, "rel_rms": errs})
            print(f"accuracy decay={decay} backward={backward} {backend:>5} bf16 vs torch fp32: {errs}", flush=True)
            write()
        for T in lengths:
            q, k, v, a = make(T, decay)
            do = torch.randn(B, T, H, D, device="cuda")
            for backend in ("torch", "fla"):
                timing = time_fn(functools.partial(run, backend, q, k, v, a, do, backward), repeats=5, cuda=True)
                row = {
                    "decay": decay,
                    "backward": backward,
                    "backend": backend,
                    "T": T,
                    **timing,
                    "tokens_per_s": B * T / timing["median_s"],
                }
                result["throughput"].append(row)
                what = "fwd+bwd" if backward else "fwd"
                print(
                    f"T={T:>6} decay={decay} {what:>7} {backend:>5}: {timing['median_s'] * 1e3:8.2f} ms "
                    f"{row['tokens_per_s'] / 1e6:8.2f} M tok/s",
                    flush=True,
                )
                write()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    args = parser.parse_args()
    result = {"machine": machine_info(), "config": {"B": B, "H": H, "head_dim": D, "dtype": "bfloat16"}}
    measure(result, lambda: write_json("gpu_kernel_check", result, args.out_dir))


if __name__ == "__main__":
    main()
