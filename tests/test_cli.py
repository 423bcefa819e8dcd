"""The seqmoe command: help, config printing, errors, and honest 'not available' answers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cli


def test_console_script_help():
    # the script installed next to this interpreter: the venv need not be activated
    script = Path(sys.executable).parent / "seqmoe"
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("train", "launch", "plan", "profile", "bench", "config"):
        assert command in out


@pytest.mark.parametrize("command", ["train", "launch", "plan", "bench", "config"])
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([command, "--help"])
    assert info.value.code == 0
    assert "usage: seqmoe" in capsys.readouterr().out


def test_config_prints_resolved_toml(capsys):
    assert cli.main(["config", "--config", "configs/tiny-cpu.toml", "--train.steps=3"]) == 0
    out = capsys.readouterr().out
    assert 'name = "tiny-cpu"' in out and "steps = 3" in out


def test_bad_override_names_the_field(capsys):
    assert cli.main(["config", "--moe.top_k=100"]) == 2
    assert "`moe.top_k`" in capsys.readouterr().err


def test_unknown_argument_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["config", "--verbose"])
    assert info.value.code == 2
    assert "--section.key=value" in capsys.readouterr().err


def test_train_rejects_a_sequence_longer_than_the_cluster_holds(capsys, tmp_path):
    argv = ["train", "configs/tiny-cpu.toml", "--launch.nproc_per_node=1", f"--train.run_dir={tmp_path}"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "sequence of 1024 tokens" in err and "lower data.max_seq_len" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_train_validates_config_before_anything_else(capsys):
    assert cli.main(["train", "--model.num_layer=2"]) == 2
    assert "did you mean `model.num_layers`" in capsys.readouterr().err


def test_python_dash_m_entry_point():
    result = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "config", "--train.seed=5"], capture_output=True, text=True, check=True
    )
    assert "seed = 5" in result.stdout


def test_profile_reports_bad_input_without_a_traceback(capsys):
    assert cli.main(["profile", "--nproc", "3", "--model.ffn=dense"]) == 2
    assert "power-of-two number of processes" in capsys.readouterr().err


@pytest.mark.slow
def test_profile_writes_a_cost_model_the_planner_reads(tmp_path, capsys):
    from planner.cost import CostModel

    out = tmp_path / "cost.json"
    argv = [
        "profile",
        "--nproc",
        "2",
        "--lengths",
        "64",
        "128",
        "--repeats",
        "1",
        "--out",
        str(out),
        "--model.ffn=dense",
        "--model.num_layers=2",
        "--model.layer_pattern=LS",
        "--model.d_model=32",
    ]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "fit: mean |error|" in printed and "training steps of 1-8 micro-batches" in printed
    cost = CostModel.from_json(out.read_text())
    assert cost.quad_ms >= 0 and cost.lin_ms >= 0 and cost.act_mb_per_token > 0


def test_bench_without_a_suite_runs_every_suite_with_the_same_arguments(monkeypatch, capsys):
    ran = []
    monkeypatch.setattr(cli, "_run_suite", lambda suite, args: ran.append((suite, args)) or 0)
    assert cli.main(["bench", "--quick", "--out-dir", "out"]) == 0
    assert [suite for suite, _ in ran] == list(cli.BENCH_SUITES)
    assert all(args == ["--quick", "--out-dir", "out"] for _, args in ran)
    ran.clear()
    monkeypatch.setattr(cli, "_run_suite", lambda suite, args: ran.append(suite) or (3 if suite == "planner" else 0))
    assert cli.main(["bench"]) == 3
    assert ran == ["sp", "planner"]  # stops at the first failing suite
    assert "suite planner failed" in capsys.readouterr().err
