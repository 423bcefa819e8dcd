"""Single-device linear-attention kernel throughput: our pure-torch chunked kernel vs fla's
chunk kernel (CUDA only), forward + backward, side by side in one run.

    python benchmarks/linear_kernels.py [--quick] [--out-dir DIR]

Writes linear_kernels.json and linear_kernels.png under --out-dir (default runs/bench/).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import DEFAULT_OUT_DIR, OUT_DIR_HELP, machine_info, time_fn, write_json  # noqa: E402
from parallel.fla_backend import fla_available  # noqa: E402
from parallel.linear_attention import chunk_linear_attention  # noqa: E402


def fwd_bwd(backend: str, q, k, v, a):
    leaves = [x.detach().requires_grad_() for x in (q, k, v, a)]

    def step():
        o, _ = chunk_linear_attention(*leaves[:3], log_decay=leaves[3], backend=backend)
        o.sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer lengths and repeats")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=OUT_DIR_HELP)
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    B, H, D = 1, 16, 128
    lengths = [4096, 16384] if args.quick else [4096, 16384, 65536, 131072]
    if not cuda:
        H, D = 4, 64
        lengths = [2048, 8192] if args.quick else [2048, 8192, 32768]
    backends = ["torch"] + (["fla"] if cuda and fla_available() else [])
    rows = []
    for T in lengths:
        g = torch.Generator(device=device).manual_seed(0)
        q = (torch.randn(B, T, H, D, device=device, generator=g) / D**0.5).to(dtype)
        k = (torch.randn(B, T, H, D, device=device, generator=g) / D**0.5).to(dtype)
        v = torch.randn(B, T, H, D, device=device, generator=g).to(dtype)
        a = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device=device, generator=g) + 3)
        for backend in backends:
            timing = time_fn(fwd_bwd(backend, q, k, v, a), repeats=3 if args.quick else 10, cuda=cuda)
            tokens_per_s = B * T / timing["median_s"]
            rows.append({"backend": backend, "T": T, **timing, "tokens_per_s": tokens_per_s})
            print(
                f"T={T:>7}  {backend:>5}: fwd+bwd {timing['median_s'] * 1e3:8.2f} ms  {tokens_per_s / 1e6:8.3f} M tok/s"
            )
    config = {
        "B": B,
        "H": H,
        "head_dim": D,
        "dtype": str(dtype),
        "device": device,
        "decay": "per-token",
        "quick": args.quick,
    }
    path = write_json("linear_kernels", {"machine": machine_info(), "config": config, "rows": rows}, args.out_dir)
    plot(rows, config, args.out_dir / "linear_kernels.png")
    print(f"wrote {path}")


def plot(rows, config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for backend in sorted({r["backend"] for r in rows}):
        mine = [r for r in rows if r["backend"] == backend]
        ax.plot([r["T"] for r in mine], [r["tokens_per_s"] / 1e6 for r in mine], marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("sequence length T")
    ax.set_ylabel("fwd+bwd throughput (M tokens/s)")
    ax.set_title(f"linear attention, H={config['H']} d={config['head_dim']} {config['dtype']} on {config['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
