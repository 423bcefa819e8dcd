"""``seqmoe plan``: lengths input, the planner-vs-baselines report (human, JSON, PNG), and clear
errors with exit code 2 for bad input."""

from __future__ import annotations

import json

import pytest

from planner import StepPlan
from planner.cost import CostModel
from planner.dryrun import DryRunError, DryRunSpec, format_ranks, read_lengths_file, run_dry_run
from runtime import cli

# 16 ranks and 64 sequences keep each solve well under a second; 16 A100s hold 78K tokens of GPT-7B
SMALL = ["--num-ranks", "16", "--batch-size", "64", "--cap", "65536", "--time-limit", "0.5"]


def run_plan(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["plan", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- lengths files ---------------------------------------------------------------------------


def test_reads_integers_and_jsonl(tmp_path):
    path = tmp_path / "lengths.txt"
    records = ["12", "", "  7  ", json.dumps({"length": 300}), json.dumps({"text": "héllo", "id": 3})]
    path.write_text("\n".join(records) + "\n")
    # "héllo" is 6 UTF-8 bytes: 6 tokens under the byte tokenizer; blank lines are skipped
    assert read_lengths_file(path) == [12, 7, 300, 6]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("5\nabc\n", "line 2: 'abc' is not an integer"),
        ("5\n2.5\n", "line 2: '2.5' is not an integer"),
        ("0\n", "line 1: length 0 is not positive"),
        ("-4\n", "line 1: length -4 is not positive"),
        ("\n\n", "holds no lengths"),
        ('{"len": 4}\n', "no integer `length` or string `text`"),
        ('{"length": 4\n', "not valid JSON"),
    ],
)
def test_bad_lengths_files_name_the_line_and_the_format(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_text(content)
    with pytest.raises(DryRunError, match=message) as info:
        read_lengths_file(path)
    assert "one positive integer per line" in str(info.value) or "at least one token" in str(info.value)


def test_format_ranks():
    assert format_ranks((8, 9, 10, 11)) == "8-11"
    assert format_ranks((3,)) == "3"
    assert format_ranks((0, 2, 5)) == "0,2,5"


# ---- the dry run -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_steps():
    spec = DryRunSpec(distribution="github", seed=3, cap=65536, batch_size=64, steps=2, num_ranks=16, time_limit_s=0.5)
    return run_dry_run(spec)


def test_dry_run_plans_every_step_with_valid_plans(two_steps):
    assert [r.step for r in two_steps.steps] == [0, 1]
    for report in two_steps.steps:
        assert len(report.lengths) == 64
        report.plan.validate(report.lengths, two_steps.cost)
        # static SP uses the degree that fits the cap, whatever this batch's longest sequence
        assert report.static_degree == two_steps.cost.min_degree(65536, 16) == 16
        assert report.speedup_vs_static > 0 and report.speedup_vs_adaptive > 0


def test_human_report(capsys):
    code, out, err = run_plan(capsys, "--distribution", "wikipedia", *SMALL)
    assert code == 0, err
    for text in ("step 0: 64 sequences", "ranks", "degree", "#seqs", "pred ms", "static SP=", "batch-adaptive SP="):
        assert text in out
    assert "speedup" in out and "solve time" in out and "lower bound" in out


def test_json_report_round_trips(capsys, tmp_path):
    cost_file = tmp_path / "cost.json"
    cost_file.write_text(CostModel.preset("flexsp-gpt7b-a100", world_size=16).to_json())
    code, out, err = run_plan(capsys, "--distribution", "commoncrawl", "--cost", str(cost_file), "--json", *SMALL)
    assert code == 0, err
    result = json.loads(out)
    assert result["config"]["num_ranks"] == 16 and result["config"]["distribution"] == "commoncrawl"
    (step,) = result["steps"]
    plan = StepPlan.from_json(json.dumps(step["plan"]))
    plan.validate(step["lengths"], CostModel.from_json(cost_file))
    assert step["predicted_time_s"] == pytest.approx(plan.predicted_time_s)
    assert step["speedup_vs_static"] == pytest.approx(step["static_sp"]["predicted_time_s"] / plan.predicted_time_s)
    assert {"degree", "predicted_time_s", "num_microbatches"} <= set(step["batch_adaptive"])
    assert sum(g["num_seqs"] for g in step["groups"]) == 64 - len(plan.dropped)
    assert result["totals"]["steps"] == 1


def test_lengths_file_batches_in_file_order(capsys, tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("\n".join(str(n) for n in [4000, 100, 2000, 9000, 50, 700, 1200]) + "\n")
    code, out, err = run_plan(capsys, "--lengths-file", str(path), "--batch-size", "3", "--steps", "5", "--json")
    assert code == 0, err
    steps = json.loads(out)["steps"]
    # 7 lengths in batches of 3: the last step is short
    assert [s["lengths"] for s in steps] == [[4000, 100, 2000], [9000, 50, 700], [1200]]


def test_plot_writes_a_png(capsys, tmp_path):
    png = tmp_path / "plots" / "plan.png"
    code, out, err = run_plan(capsys, "--distribution", "github", "--steps", "2", "--plot", str(png), *SMALL)
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {png}" in out


# ---- errors: named, with a fix, exit code 2, no traceback --------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--lengths-file", "/nonexistent/lengths.txt"], "does not exist"),
        (["--num-ranks", "12"], "--num-ranks 12 is not a power of two"),
        (["--cost", "flexsp-gpt7b"], "unknown cost-model preset 'flexsp-gpt7b'; did you mean 'flexsp-gpt7b-a100'?"),
        (["--cost", "missing.json"], "cost-model file 'missing.json' does not exist"),
        (["--num-ranks", "2"], "cost-model preset 'flexsp-gpt7b-a100' on 2 ranks"),
        (["--distribution", "wiki"], "unknown distribution 'wiki'"),
        (["--batch-size", "0"], "--batch-size must be a positive integer"),
        (["--time-limit", "0"], "--time-limit must be positive"),
        (["--num-ranks", "8"], "--cap 196,608: a sequence of 196,608 tokens does not fit the cluster"),
    ],
)
def test_bad_input_is_a_clear_error(capsys, argv, message):
    code, out, err = run_plan(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert err.startswith("seqmoe plan: ")


def test_too_long_sequence_in_a_file(capsys, tmp_path):
    path = tmp_path / "long.txt"
    path.write_text("100\n5000000\n")
    code, _, err = run_plan(capsys, "--lengths-file", str(path))
    assert code == 2
    assert "5,000,000 tokens does not fit the cluster" in err and "--num-ranks" in err


def test_bad_file_line_through_the_cli(capsys, tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("100\nfoo\n")
    code, _, err = run_plan(capsys, "--lengths-file", str(path))
    assert code == 2 and "line 2: 'foo' is not an integer" in err


def test_bad_cost_json(capsys, tmp_path):
    path = tmp_path / "cost.json"
    path.write_text('{"quad_ms": 1}')
    code, _, err = run_plan(capsys, "--cost", str(path))
    assert code == 2 and "is not a valid cost model" in err


def test_file_and_distribution_are_exclusive(capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        cli.main(["plan", "--lengths-file", "x.txt", "--distribution", "github"])
    assert info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_all_groups_lists_every_group_and_ignored_options_are_named(capsys, tmp_path):
    path = tmp_path / "lengths.txt"
    path.write_text("\n".join(["1000"] * 40) + "\n")
    code, out, err = run_plan(capsys, "--lengths-file", str(path), "--seed", "3", "--num-ranks", "16", "--all-groups")
    assert code == 0
    assert "--seed and --cap apply to built-in distributions; ignored with --lengths-file" in err
    table = [line for line in out.splitlines() if line.startswith("    0  ")]
    # one row per group: the rows' ranks tile the 16 ranks of micro-batch 0
    assert sum(int(line.split()[2]) for line in table) == 16 and all(line.split()[3] == "1" for line in table)
