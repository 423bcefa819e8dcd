"""GPU checks (skipped without CUDA): the fla path against the pure-torch path in bf16, LASP-2
on CUDA through the fla local kernel, per-document softmax attention's CUDA backends; and, on
any machine, the dry mode of the prepared GPU script (benchmarks/gpu_kernels.py).

Metric: relative RMS error ||x - ref|| / ||ref|| against an fp32 pure-torch reference computed
from the same (bf16-rounded) inputs. Tolerance 3e-3, the bound fla's own context-parallel tests
use for bf16 (research/lasp2.md section 5).
"""

from __future__ import annotations

import pytest
import torch

from parallel.fla_backend import fla_available, fla_gated_backward_ok
from parallel.linear_attention import chunk_linear_attention
from tests.sp_sim import simulate_lasp2

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16_TOL = 3e-3


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.float() - ref.float()).norm() / ref.float().norm()).item()


def _inputs(B, T, H, D, decay, docs, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # unit-variance q, k / sqrt(D): keeps unnormalised linear attention at O(1) per token
    q = (torch.randn(B, T, H, D, device="cuda", generator=g) / D**0.5).bfloat16()
    k = (torch.randn(B, T, H, D, device="cuda", generator=g) / D**0.5).bfloat16()
    v = torch.randn(B, T, H, D, device="cuda", generator=g).bfloat16()
    a = None
    if decay == "head":
        a = -torch.linspace(0.01, 0.2, H, device="cuda")
    elif decay == "token":
        a = torch.nn.functional.logsigmoid(torch.randn(B, T, H, device="cuda", generator=g) + 3)
    cu = None
    if docs:
        cu = torch.tensor([0, T // 5, T // 5 + 1, T // 2, T - 7, T], device="cuda")
    return q, k, v, a, cu


def _run(backend, q, k, v, a, cu, do, h0=None, decay_grad=True, backward=True):
    leaves = [None if x is None else x.detach().clone().requires_grad_(backward) for x in (q, k, v, a, h0)]
    if leaves[3] is not None and not decay_grad:
        leaves[3] = leaves[3].detach()
    o, final = chunk_linear_attention(
        *leaves[:3],
        log_decay=leaves[3],
        cu_seqlens=cu,
        initial_state=leaves[4],
        output_final_state=True,
        backend=backend,
    )
    if not backward:
        return [o, final]
    (o.float() * do).sum().add((final * 0.1).sum()).backward()
    return [o, final] + [None if x is None else x.grad for x in leaves]


# Each distinct specialisation (decay kind, documents, initial state, head dims) makes fla's Triton
# kernels autotune ~48 configurations on first use, minutes per case: the cases are few and share
# the benchmark's head dim (128).
FLA_CASES = [
    ("token", False, False),  # per-token gates, one sequence per batch row
    ("token", True, True),  # per-token gates, packed documents, initial state
    ("frozen_head", False, True),  # a fixed per-head decay without gradient: fla's g_gamma path
]


@needs_cuda
@pytest.mark.skipif(not fla_available(), reason="flash-linear-attention is not installed")
@pytest.mark.parametrize("decay,docs,with_h0", FLA_CASES, ids=["token", "token-packed-h0", "head-h0"])
def test_fla_path_matches_torch_path_bf16(decay, docs, with_h0):
    B, T, Hh, D = (1 if docs else 2), 2048, 4, 128
    q, k, v, a, cu = _inputs(B, T, Hh, D, "head" if decay == "frozen_head" else decay, docs)
    do = torch.randn(B, T, Hh, D, device="cuda")
    h0 = torch.randn(B, Hh, D, D, device="cuda") * 0.05 if with_h0 else None
    a_grad = decay != "frozen_head"
    # fla refuses the backward of per-token gates on Hopper with Triton in [3.4, 3.7.1): forward only there
    backward = not a_grad or fla_gated_backward_ok()
    got = _run("fla", q, k, v, a, cu, do, h0, decay_grad=a_grad, backward=backward)
    floats = (None if x is None else x.float() for x in (q, k, v, a))
    ref = _run("torch", *floats, cu, do, h0, decay_grad=a_grad, backward=backward)
    for name, x, y in zip(["o", "final_state", "dq", "dk", "dv", "dlog_decay", "dh0"], got, ref):
        if y is None:
            continue
        assert rel_rms(x, y) <= BF16_TOL, f"{name}: relative RMS {rel_rms(x, y):.2e}"


@needs_cuda
@pytest.mark.skipif(not fla_available(), reason="flash-linear-attention is not installed")
def test_auto_backend_avoids_fla_where_it_refuses_the_gated_backward():
    q, k, v, a, _ = _inputs(1, 256, 2, 64, "token", docs=False)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, a)]
    o, _ = chunk_linear_attention(*leaves[:3], log_decay=leaves[3], backend="auto")
    o.float().sum().backward()  # raises inside fla if auto picked it on a stack where fla refuses
    assert all(x.grad is not None for x in leaves)


@needs_cuda
def test_lasp2_on_cuda_bf16_matches_fp32_reference():
    W, T = 4, 512
    q, k, v, a, cu = _inputs(1, W * T, 4, 128, "token", docs=True, seed=1)
    do = torch.randn(1, W * T, 4, 128, device="cuda").bfloat16()
    got = simulate_lasp2(q, k, v, a, cu, W=W, causal=True, do=do, chunk_size=64)
    ref = simulate_lasp2(
        *(None if x is None else x.float() for x in (q, k, v, a)), cu, W=W, causal=True, do=do.float(), chunk_size=64
    )
    for name, x, y in zip(["o", "dq", "dk", "dv", "dlog_decay"], got, ref):
        assert rel_rms(x, y) <= BF16_TOL, f"{name}: relative RMS {rel_rms(x, y):.2e}"


@needs_cuda
@pytest.mark.parametrize("backend", ["flash", "flex", "sdpa"])
def test_doc_attention_cuda_backends_match_fp32_reference(backend):
    from parallel.doc_attention import doc_attention, select_backend

    g = torch.Generator(device="cuda").manual_seed(0)
    S, q_offset, T, bounds = 1024, 256, 512, [0, 100, 300, 301, 700, 1024]
    q = torch.randn(1, T, 8, 64, device="cuda", generator=g).bfloat16()
    k, v = (torch.randn(1, S, 4, 64, device="cuda", generator=g).bfloat16() for _ in range(2))
    try:
        select_backend(q, v, backend)
    except ValueError as exc:
        pytest.skip(str(exc))
    do = torch.randn(1, T, 8, 64, device="cuda", generator=g)
    results = []
    for inputs, chosen in (((q, k, v), backend), ((q.float(), k.float(), v.float()), "sdpa")):
        leaves = [t.detach().requires_grad_() for t in inputs]
        o = doc_attention(*leaves, q_offset=q_offset, causal=True, bounds=bounds, scale=0.125, backend=chosen)
        o.float().backward(do)
        results.append([o] + [t.grad for t in leaves])
    for name, x, y in zip(["o", "dq", "dk", "dv"], *results):
        assert rel_rms(x, y) <= 2e-2, f"{name}: relative RMS {rel_rms(x, y):.2e}"  # bf16 inputs


def test_gpu_script_dry_mode_runs_top_to_bottom(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "benchmarks/gpu_kernels.py", "--dry", "--out-dir", str(tmp_path)]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True, timeout=600)
    result = json.loads((tmp_path / "gpu_kernels_dry.json").read_text())
    assert all(status["ok"] for status in result["stage_status"].values()), result["stage_status"]
    assert set(result["stage_status"]) == {"softmax", "linear", "experts", "train"}
    methods = {r["method"] for r in result["softmax"] if "median_s" in r}
    assert methods == {"sdpa", "dense", "one_by_one"}  # flash / flex need CUDA: skipped on CPU
    assert all(r["rel_rms"]["o"] < 1e-5 for r in result["softmax"] if "rel_rms" in r)
    assert {r["compute"] for r in result["experts"]} == {"loop", "grouped"}
    (train,) = result["train"]
    assert train["counted_flops"] > 0 and train["tokens_per_s"] > 0
    assert train["profile"]["by_class_ms"]
