"""Logs: plain progress lines every train.log_every steps off a terminal, the start-up lines
(parameters total / active per token, data, world, plan policy, cost model), ``seqmoe --version``."""

from __future__ import annotations

import io
import json
from types import SimpleNamespace

import pytest

from runtime import __version__
from runtime.cli import main
from runtime.config import load_config
from runtime.progress import Progress


def _row(step: int, **extra) -> dict:
    plan = {"microbatches": 1, "degrees": {"2": 1}, "predicted_time_s": 0.1, "solve_time_s": 0.01, "solver": "x"}
    base = {"step": step, "loss": 5.0 - step / 10, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 1000.0}
    return {**base, "step_time_s": 0.2, "plan": plan, "skipped": False, **extra}


def test_plain_progress_lines_every_log_every_steps():
    stream = io.StringIO()  # not a TTY, as in a Slurm log or a pipe
    progress = Progress(start=0, steps=7, log_every=3, enabled=True, stream=stream)
    for step in range(7):
        progress.update(_row(step, **({"eval_loss": 4.0} if step == 4 else {})))
    progress.close()
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 3/7", "step 5/7", "step 6/7", "step 7/7"]
    assert "eval 4.0000" in lines[1] and "plan 1mb 1×d2" in lines[0] and "loss 4.8000" in lines[0]
    assert "\r" not in stream.getvalue()
    silent = io.StringIO()
    other_rank = Progress(start=0, steps=3, log_every=1, enabled=False, stream=silent)
    for step in range(3):
        other_rank.update(_row(step))
    assert silent.getvalue() == ""


def test_a_terminal_gets_the_bar_not_lines():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    progress = Progress(start=2, steps=4, log_every=1, enabled=True, stream=stream)
    assert progress.bar is not None and progress.bar.n == 2
    progress.update(_row(2))
    assert progress.bar.n == 3 and "loss 4.800" in progress.bar.postfix
    progress.close()
    assert stream.getvalue() == ""


def _tiny(ffn: str, ep_size: int = 1):
    return load_config(
        None,
        [f"--model.ffn={ffn}", "--model.d_model=32", "--model.ffn_hidden=48", "--model.num_layers=2",
         "--moe.num_experts=4", "--moe.top_k=2", "--moe.router=linear", f"--moe.ep_size={ep_size}"],
    )  # fmt: skip


@pytest.mark.parametrize("ffn", ["dense", "moe"])
def test_parameter_counts_total_and_active(ffn):
    from runtime.model import build_model
    from runtime.startup import parameter_counts

    config = _tiny(ffn)
    model = build_model(config.model, config.parallel, config.moe)
    total, active = parameter_counts(model, config)
    assert total == sum(p.numel() for p in model.parameters())
    if ffn == "dense":
        assert active == total
    else:
        per_expert = 32 * 2 * 48 + 48 * 32  # SwiGLU up (gate and up) + down
        experts = 2 * 4 * per_expert  # 2 layers x 4 experts
        assert active == total - experts + 2 * 2 * per_expert  # top-2 of 4 in each layer


def test_startup_lines_name_parameters_data_world_plan_and_cost(tmp_path):
    from planner.cost import CostModel
    from runtime.data import build_dataset
    from runtime.model import build_model
    from runtime.startup import startup_lines

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": "x" * (20 + i)}) + "\n" for i in range(40)))
    config = load_config(None, ["--data.source=jsonl", f"--data.path={data}", "--model.d_model=32",
                                "--planner.mode=static", "--planner.static_degree=2"])  # fmt: skip
    dataset = build_dataset(config.data, vocab_size=256)
    model = build_model(config.model, config.parallel, config.moe)
    ctx = SimpleNamespace(world_size=2, backend="gloo", device="cpu", rank=0)
    cost = CostModel.preset("tiny-cpu", world_size=2)
    lines = startup_lines(config, ctx, dataset, model, cost)
    text = "\n".join(lines)
    assert len(lines) == 5 and text.startswith(f"seqmoe {__version__}: run run")
    assert "parameters" in lines[1] and "active per token" in lines[1] and "MoE 8 experts top-2" in lines[1]
    assert f"jsonl {data}" in lines[2] and f"train {dataset.num_train_documents} sequences" in lines[2]
    assert f"validation {dataset.num_validation_documents}" in lines[2]
    assert lines[3].startswith("world: 2 ranks (gloo on cpu)") and "ZeRO stage 1" in lines[3]
    assert "static SP degree 2" in lines[4] and "cost model tiny-cpu" in lines[4]


def test_version(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"seqmoe {__version__}"


BENCHMARKS = ["sp_ops", "planner", "moe", "e2e", "projection", "linear_kernels", "gpu_kernel_check"]


@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmarks_default_to_an_uncommitted_out_dir(name):
    """Trying a benchmark never overwrites the committed benchmarks/results/: the default --out-dir
    is git-ignored (runs/bench/), and the committed folder
    is written only when named."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.common import DEFAULT_OUT_DIR, RESULTS_DIR

    repo = Path(__file__).resolve().parent.parent
    assert repo / "runs" / "bench" == DEFAULT_OUT_DIR and DEFAULT_OUT_DIR != RESULTS_DIR
    assert "runs/" in (repo / ".gitignore").read_text().split()
    out = subprocess.run(
        [sys.executable, f"benchmarks/{name}.py", "--help"], cwd=repo, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    text = " ".join(out.stdout.split())
    assert "git-ignored" in text and "default benchmarks/results" not in text


def test_each_venv_gets_its_own_torch_extensions_dir(monkeypatch, tmp_path):
    import os
    import sys

    from parallel.op_build import use_venv_extensions_dir

    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(sys, "base_prefix", "/usr")
    use_venv_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "torch_extensions")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/somewhere/else")  # a user's own choice stays
    use_venv_extensions_dir()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/somewhere/else"


def test_deepspeeds_op_is_built_with_the_venvs_ninja_whatever_the_path(monkeypatch, tmp_path):
    """Ninja 1.11 and 1.13 read each other's build log as stale, so whichever ninja a process found
    first on PATH rebuilt DeepSpeed's op (parallel/op_build.py): inside one_op_build it is pip's, and
    PATH is the caller's again afterwards."""
    import os
    import shutil

    ninja = pytest.importorskip("ninja")
    from parallel.op_build import one_op_build

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    for path in ("/usr/bin:/bin", f"{ninja.BIN_DIR}{os.pathsep}/usr/bin"):
        monkeypatch.setenv("PATH", path)
        with one_op_build():
            assert shutil.which("ninja") == os.path.join(ninja.BIN_DIR, "ninja")
            assert os.environ["TORCH_EXTENSIONS_DIR"] == str(tmp_path / "ext")
        assert os.environ["PATH"] == path
