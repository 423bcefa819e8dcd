"""The scaling benchmark (benchmarks/scaling.py): the sweep config and its one-line errors, the
efficiency arithmetic, the batches, and real runs under the real launchers: `seqmoe bench scaling`
starts one torchrun job per world size (2 and 4 gloo ranks), and one sbatch job under a real
one-node Slurm (tests/slurm_fixture.py) when the daemons are installed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scaling_report import efficiency_table, summarise_mode
from benchmarks.scaling_sweep import SweepError, load_sweep, policies_at
from planner.cost import CostModel
from planner.plan import StepPlan
from tests.test_launchers import job_env

REPO = Path(__file__).resolve().parent.parent
SEQMOE = Path(sys.executable).parent / "seqmoe"
TINY = REPO / "configs" / "scaling-tiny-cpu.toml"
# plan invariance of one fp32 training step over gloo (DESIGN.md invariant 2)
LOSS_RTOL = 1e-5

GOOD = """
[sweep]
name = "s"
config = "{config}"
world_sizes = [2, 1]
policies = ["flexsp", "static", "megatron_dcp"]
steps = 2
[sweep.weak]
tokens_per_rank = 256
[sweep.strong]
global_tokens = 512
[launch]
nproc_per_node = 2
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text.replace("{config}", str(REPO / "configs" / "tiny-cpu.toml")))
    return path


def test_sweep_config_reads_and_expands_policies(tmp_path):
    sweep = load_sweep(_write(tmp_path, GOOD))
    assert sweep.world_sizes == [1, 2] and sweep.modes == ["weak", "strong"] and sweep.warmup == 1
    assert sweep.target_tokens("weak", 2) == 512 and sweep.target_tokens("strong", 2) == 512
    assert policies_at(sweep, 2, [1, 2, 4]) == ["flexsp", "static-1", "static-2", "megatron_dcp"]
    assert policies_at(sweep, 1, [1, 2, 4]) == ["flexsp", "static-1", "megatron_dcp"]
    # the world sizes and the launch do not change which per-size results belong together
    other = load_sweep(_write(tmp_path, GOOD.replace("[2, 1]", "[4]")), launch_overrides=["--launch.launcher=slurm"])
    assert other.fingerprint() == sweep.fingerprint() and other.launch.launcher == "slurm"
    assert load_sweep(_write(tmp_path, GOOD.replace("steps = 2", "steps = 3"))).fingerprint() != sweep.fingerprint()
    for path in (TINY, REPO / "configs" / "scaling-sweep.toml"):  # the committed sweeps load
        assert load_sweep(path).world_sizes


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (("[2, 1]", "[3]"), "sweep.world_sizes entry 3"),
        (("[2, 1]", "[]"), "sweep.world_sizes is empty"),
        (("[2, 1]", "[2, 2]"), "lists a size twice"),
        (('"megatron_dcp"]', '"megatron"]'), "sweep.policies entry 'megatron'"),
        (('"static",', '"static-3",'), "sweep.policies entry 'static-3'"),
        (("steps = 2", "steps = 0"), "sweep.steps = 0"),
        (("steps = 2", "steps = 'two'"), "sweep.steps = 'two' must be a int"),
        (("steps = 2", "stpes = 2"), "unknown key(s) sweep.stpes"),
        (("tokens_per_rank = 256", "tokens_per_rank = -1"), "sweep.weak.tokens_per_rank = -1"),
        (("global_tokens = 512", "tokens = 512"), "[sweep.strong] takes exactly one key, global_tokens"),
        (("nproc_per_node = 2", "nproc_per_node = 0"), "launch.nproc_per_node"),
        (("nproc_per_node = 2", "nnodes = 2"), "launch.nnodes = 2"),
        (('config = "{config}"', 'config = "nowhere.toml"'), "sweep.config"),
    ],
)
def test_bad_sweep_is_one_line_naming_the_field(tmp_path, edit, field):
    old, new = edit
    assert old in GOOD
    with pytest.raises(SweepError) as info:
        load_sweep(_write(tmp_path, GOOD.replace(old, new)))
    message = str(info.value)
    assert field in message and "\n" not in message, message


def test_bad_sweep_on_the_command_line_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, GOOD.replace("[2, 1]", "[6]"))
    result = subprocess.run(
        [str(SEQMOE), "bench", "scaling", str(path), "--out-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
        env=job_env(),
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "sweep.world_sizes entry 6" in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # nothing was launched


def _stage(times: dict[str, list[float]], tokens: int = 1000) -> dict:
    rows = [
        {"policy": p, "step": i, "measured": True, "step_s": t, "fwd_bwd_s": t / 2, "predicted_step_s": 2 * t,
         "cpu_s_all_ranks": t, "tokens": tokens, "loss": 5.0, "solve_time_s": 0.01, "microbatches": 1}
        for p, ts in times.items() for i, t in enumerate(ts)
    ]  # fmt: skip
    return {"rows": rows, "policies": {p: {"status": "ran"} for p in times}}


def test_efficiency_arithmetic():
    """Weak: t(W0)/t(W); strong: (t(W0)/t(W)) / (W/W0); exact on made-up medians (tolerance 1e-12)."""
    by_size = {
        1: summarise_mode(_stage({"a": [1.0, 1.0, 3.0]}))["per_policy"],  # median 1.0
        2: summarise_mode(_stage({"a": [1.25]}))["per_policy"],
        4: summarise_mode(_stage({"a": [2.0]}))["per_policy"],
    }
    by_size[1]["b"] = {"status": "skipped", "reason": "too small"}
    weak = efficiency_table("weak", by_size)
    assert weak["a"]["world_sizes"] == [1, 2, 4] and weak["a"]["baseline_world_size"] == 1
    assert weak["a"]["efficiency"] == pytest.approx([1.0, 0.8, 0.5], abs=1e-12)
    assert weak["b"] == {"world_sizes": [], "skipped": {"1": "too small"}}
    strong = efficiency_table("strong", {1: by_size[1], 2: by_size[2], 4: by_size[4]})
    assert strong["a"]["speedup"] == pytest.approx([1.0, 0.8, 0.5], abs=1e-12)
    assert strong["a"]["efficiency"] == pytest.approx([1.0, 0.4, 0.125], abs=1e-12)
    assert by_size[2]["a"]["step_time_error_pct"]["median"] == pytest.approx(100.0, abs=1e-9)


def test_token_batches_are_prefixes_within_the_target():
    from benchmarks.scaling import token_batch
    from runtime.config import load_config
    from runtime.data import build_dataset

    config = load_config(REPO / "configs" / "tiny-cpu.toml", ["--data.max_seq_len=256"])
    dataset = build_dataset(config.data, vocab_size=config.model.vocab_size)
    mean = dataset.length_stats()["mean"]
    for target in (100, 1024, 4096):
        a = token_batch(dataset, 3, 0, target, mean)
        b = token_batch(dataset, 3, 0, target, mean)
        assert a.document_ids == b.document_ids and a.lengths  # deterministic, never empty
        assert sum(a.lengths) <= target or len(a.lengths) == 1
        nxt = dataset.train_batch(3, 0, num_sequences=len(a.lengths) + 64).lengths[len(a.lengths)]
        assert sum(a.lengths) + nxt > target  # the longest prefix that fits


ALL_KINDS = ("flexsp", "batch_adaptive", "megatron_dcp", "static")


def _check_report(
    out: Path,
    sizes: list[int],
    source: str,
    *,
    name: str = "scaling-tiny-cpu",
    modes=("weak", "strong"),
    kinds=ALL_KINDS,
) -> dict:
    report = json.loads((out / f"{name}.json").read_text())
    assert (out / f"{name}.png").stat().st_size > 0
    assert report["world_sizes"] == sizes and not report["missing_world_sizes"]
    assert not report["incomplete_world_sizes"]
    for W in sizes:
        payload = json.loads((out / f"{name}_w{W}.json").read_text())
        assert payload["complete"] and payload["world_size"] == W and payload["launch"]["source"] == source
        assert payload["backend"] == "gloo" and payload["device"] == "cpu"
        cost = CostModel.from_json(payload["cost_model"]["json"])
        expected = {k for k in kinds if k != "static"}
        expected |= {f"static-{d}" for d in (1, 2, 4) if d <= W and "static" in kinds}
        assert set(payload["modes"]) == set(modes)
        for mode in modes:
            stage = payload["modes"][mode]
            assert set(stage["policies"]) == expected, (W, mode)
            assert all(p["status"] == "ran" for p in stage["policies"].values()), stage["policies"]
            for planned in stage["policies"].values():
                assert len(planned["plans"]) == len(stage["batch_lengths"]) == 2
                for plan_json, lengths in zip(planned["plans"], stage["batch_lengths"]):
                    plan = StepPlan.from_json(plan_json)
                    assert plan.num_ranks == W
                    plan.validate(lengths, cost)  # every sequence once, groups tile the ranks, memory fits
            rows = stage["rows"]
            assert sorted((r["policy"], r["step"]) for r in rows) == sorted((p, s) for p in expected for s in (0, 1))
            for r in rows:
                assert r["tokens"] == sum(stage["batch_lengths"][r["step"]]) and r["step_s"] > 0
                assert math.isfinite(r["loss"]) and r["predicted_step_s"] > 0
            # same weights, same batch, different plans: the same loss (plan invariance)
            losses = stage["summary"]["step0_loss"]
            assert set(losses) == expected
            first = losses["flexsp"]
            assert all(abs(v - first) <= LOSS_RTOL * abs(first) for v in losses.values()), losses
            assert stage["summary"]["step0_loss_max_rel_diff"] <= LOSS_RTOL
    for mode in modes:
        table = report["scaling"][mode]
        for policy in [k if k != "static" else "static-1" for k in kinds]:
            entry = table[policy]
            assert entry["world_sizes"] == sizes and entry["baseline_world_size"] == sizes[0]
            assert all(v > 0 for v in entry["tokens_per_s"])
            assert all(math.isfinite(v) and v > 0 for v in entry["efficiency"] + entry["throughput_efficiency"])
            assert entry["efficiency"][0] == pytest.approx(1.0, abs=1e-12)
            assert all(math.isfinite(v) for v in entry["step_time_error_pct"] + entry["predicted_step_s"])
        if mode == "strong":
            assert table["flexsp"]["ideal_speedup"] == [W / sizes[0] for W in sizes]
    # strong scaling trains the same batches at every size
    strong = [json.loads((out / f"{name}_w{W}.json").read_text())["modes"]["strong"] for W in sizes]
    assert all(s["batch_lengths"] == strong[0]["batch_lengths"] for s in strong)
    return report


@pytest.mark.slow
def test_scaling_under_torchrun_with_2_and_4_ranks(tmp_path):
    """`seqmoe bench scaling`: one torchrun launch per world size (2, then 4 gloo ranks)."""
    out = tmp_path / "out"
    command = [str(SEQMOE), "bench", "scaling", str(TINY), "--world-sizes", "2", "4", "--out-dir", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=job_env(), cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "world size 4 (1 node(s) x 4)" in result.stdout
    _check_report(out, [2, 4], "torchrun")


@pytest.mark.slow
def test_scaling_under_slurm_srun(slurm, tmp_path):
    """The same benchmark as an sbatch job whose srun starts one task per rank (launchers/env.py
    reads the Slurm variables), submitted and waited for by the driver."""
    out = tmp_path / "out"
    # the launcher path is what this test adds: strong scaling only, two policies (the torchrun test has all),
    # trained one after the other (interleave = false: the GPU sweep's memory-saving order)
    sweep = TINY.read_text().replace('name = "scaling-tiny-cpu"', 'name = "scaling-slurm"')
    sweep = sweep.replace('modes = ["weak", "strong"]', 'modes = ["strong"]')
    sweep = sweep.replace('config = "tiny-cpu.toml"', f'config = "{REPO / "configs" / "tiny-cpu.toml"}"')
    sweep = sweep.replace('"flexsp", "static", "batch_adaptive", "megatron_dcp"', '"flexsp", "megatron_dcp"')
    sweep = sweep.replace("interleave = true", "interleave = false")  # one model at a time, as on GPUs
    path = tmp_path / "sweep.toml"
    path.write_text(sweep)
    command = [str(SEQMOE), "bench", "scaling", str(path), "--world-sizes", "2", "--out-dir", str(out)]
    command += ["--launch.launcher=slurm", "--launch.submit=true", "--launch.slurm_mode=srun"]
    command += ["--launch.slurm_time=00:05:00"]
    env = job_env(slurm.env) | {"SLURM_CONF": slurm.env["SLURM_CONF"]}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    outputs = "".join(p.read_text(errors="replace")[-3000:] for p in out.rglob("slurm-*.out"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + outputs
    assert (out / "launch" / "w2" / "scaling-slurm-w2.sbatch").is_file()
    _check_report(out, [2], "slurm", name="scaling-slurm", modes=("strong",), kinds=("flexsp", "megatron_dcp"))
