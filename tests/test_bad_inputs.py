"""A new user's bad inputs: each is one clear line, a distinct exit code, and loses nothing.

Every case runs the real ``seqmoe`` command in a subprocess (PYTHONPATH = this checkout) and
checks: the exit code; exactly one non-empty line on stderr, starting ``seqmoe`` and naming the
problem (the phrases listed); no "Traceback" anywhere; and that every file that existed before
(the inputs, and a copied run folder with history) is still there, byte for byte, afterwards.
Most cases fail in the preflight, before DeepSpeed is imported; the few that need a trained run
folder copy one made once per module. ``tests/BAD_INPUTS.md`` was written
from these cases.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SEQMOE = Path(sys.executable).parent / "seqmoe"
TINY = (
    str(REPO / "configs" / "tiny-cpu.toml"),
    "--launch.nproc_per_node=1",
    "--data.global_batch_sequences=4",
    "--data.max_seq_len=256",
    "--model.d_model=32",
    "--planner.mode=batch_adaptive",
    "--train.eval_every=0",
)
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCHER_VARS and not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
    }
    env.update(PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", os.defpath)])
    return env | (extra or {})


def seqmoe(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    return subprocess.run([str(SEQMOE), *args], cwd=cwd, env=_env(env), capture_output=True, text=True, timeout=timeout)


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under ``root``."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _record(case: str, args: list[str], result, intact: bool) -> None:
    """With SEQMOE_BAD_INPUTS_TABLE=PATH, one JSON row per case for the BAD_INPUTS.md table."""
    path = os.environ.get("SEQMOE_BAD_INPUTS_TABLE")
    if path:
        line = next((x for x in result.stderr.splitlines() if x.strip()), "")
        row = {"case": case, "args": args, "code": result.returncode, "line": line, "intact": intact}
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


def assert_one_line(result, code: int, phrases: list[str]) -> str:
    report = f"exit {result.returncode}\n--- stdout\n{result.stdout[-2000:]}\n--- stderr\n{result.stderr[-3000:]}"
    assert result.returncode == code, report
    assert "Traceback" not in result.stdout + result.stderr, report
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("seqmoe "), report
    for phrase in phrases:
        assert phrase in lines[0], (phrase, report)
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run folder with history: 2 steps, a checkpoint after each (keep both)."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    result = seqmoe(
        "train", *TINY, "--train.steps=2", "--train.checkpoint_every=1", f"--train.run_dir={run}", cwd=root, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "step_000002" / "manifest.json").is_file()
    return run


def _copy_run(trained: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    return run


def _files(tmp_path: Path) -> dict[str, Path]:
    """Bad input files, written into ``tmp_path``."""
    f = {}
    f["latin1"] = tmp_path / "latin1.toml"
    f["latin1"].write_bytes('name = "caf\xe9"\n'.encode("latin-1"))
    f["bad_toml"] = tmp_path / "bad.toml"
    f["bad_toml"].write_text("[train\nsteps = 3\n")
    f["surrogate"] = tmp_path / "surrogate.jsonl"
    f["surrogate"].write_text('{"text": "fine"}\n{"text": "half a pair \\ud800 here"}\n')
    f["bad_json"] = tmp_path / "bad.jsonl"
    f["bad_json"].write_text('{"text": "fine"}\n{"text": "no end\n')
    f["not_text"] = tmp_path / "number.jsonl"
    f["not_text"].write_text('{"text": "fine"}\n{"text": 3}\n')
    f["bad_utf8"] = tmp_path / "bytes.jsonl"
    f["bad_utf8"].write_bytes(b'{"text": "fine"}\n{"text": "\xff\xfe"}\n')
    f["one_doc"] = tmp_path / "one.jsonl"
    f["one_doc"].write_text(json.dumps({"text": "a single document " * 20}) + "\n")
    f["many_docs"] = tmp_path / "many.jsonl"
    f["many_docs"].write_text("".join(json.dumps({"text": f"document {i} " * 30}) + "\n" for i in range(40)))
    f["cost_json"] = tmp_path / "cost.json"
    f["cost_json"].write_text('{"name": "x", "alpha": ')
    _megatron(tmp_path)
    f["file_in_the_way"] = tmp_path / "a-file"
    f["file_in_the_way"].write_text("not a folder")
    return f


def _megatron(tmp_path: Path) -> None:
    """A valid Megatron dataset (tokens as uint8) and a copy with its .idx cut short."""
    import warnings

    import numpy as np
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "good.bin"), dtype=np.uint8)
    for i in range(12):
        builder.add_item(torch.tensor(list(f"document {i} ".encode() * 8), dtype=torch.uint8))
        builder.end_document()
    builder.finalize(str(tmp_path / "good.idx"))
    shutil.copy(tmp_path / "good.bin", tmp_path / "cut.bin")
    (tmp_path / "cut.idx").write_bytes((tmp_path / "good.idx").read_bytes()[:60])
    shutil.copy(tmp_path / "good.idx", tmp_path / "nobin.idx")


# name -> (command and arguments, exit code, phrases of the one line); "{tmp}" is tmp_path,
# "{run}" a fresh run folder. Cases needing a trained folder are in HISTORY_CASES.
T = ("train", *TINY)
CASES: dict[str, tuple[tuple[str, ...], int, list[str]]] = {
    "TOML file that is not UTF-8": (("train", "--config", "{tmp}/latin1.toml"), 2, ["not UTF-8", "latin1.toml"]),
    "TOML syntax error": (("train", "--config", "{tmp}/bad.toml"), 2, ["not valid TOML"]),
    "config file missing": (("train", "--config", "{tmp}/nowhere.toml"), 2, ["does not exist", "configs/"]),
    "--train.lr=inf": ((*T, "--train.lr=inf"), 2, ["train.lr", "finite"]),
    "--train.lr=nan": ((*T, "--train.lr=nan"), 2, ["train.lr", "finite"]),
    "--parallel.timeout_s=inf": ((*T, "--parallel.timeout_s=inf"), 2, ["parallel.timeout_s", "finite"]),
    "misspelt key": ((*T, "--train.stpes=3"), 2, ["did you mean `train.steps`"]),
    "top_k > num_experts": ((*T, "--moe.top_k=9"), 2, ["moe.top_k", "num_experts"]),
    "jsonl file missing": ((*T, "--data.source=jsonl", "--data.path={tmp}/nowhere.jsonl"), 1, ["nowhere.jsonl"]),
    "jsonl lone surrogate": (
        (*T, "--data.source=jsonl", "--data.path={tmp}/surrogate.jsonl"),
        1,
        ["line 2", "lone surrogate"],
    ),
    "jsonl invalid JSON": ((*T, "--data.source=jsonl", "--data.path={tmp}/bad.jsonl"), 1, ["line 2", "invalid JSON"]),
    "jsonl text not a string": ((*T, "--data.source=jsonl", "--data.path={tmp}/number.jsonl"), 1, ["line 2", "text"]),
    "jsonl invalid UTF-8": ((*T, "--data.source=jsonl", "--data.path={tmp}/bytes.jsonl"), 1, ["line 2"]),
    "megatron .idx truncated": (
        (*T, "--data.source=megatron", "--data.path={tmp}/cut"),
        1,
        ["cut.idx", "truncated"],
    ),
    "megatron .bin missing": ((*T, "--data.source=megatron", "--data.path={tmp}/nobin"), 1, ["nobin.bin"]),
    "validation_fraction=0 with eval_every": (
        (*T, "--data.validation_fraction=0", "--train.eval_every=5"),
        2,
        ["train.eval_every=5", "validation_fraction=0"],
    ),
    "corpus too small for a validation split": (
        (*T, "--data.source=jsonl", "--data.path={tmp}/one.jsonl", "--train.eval_every=5"),
        2,
        ["train.eval_every=5", "too few"],
    ),
    "static_degree larger than the world": (
        (*T, "--planner.mode=static", "--planner.static_degree=2"),
        2,
        ["planner.static_degree=2", "1 rank"],
    ),
    "config: nproc_per_node=3": (
        ("config", "--config", TINY[0], "--launch.nproc_per_node=3"),
        2,
        ["3 ranks", "power-of-two"],
    ),
    "config: static_degree 8 on 4 ranks": (
        ("config", "--config", TINY[0], "--planner.mode=static", "--planner.static_degree=8"),
        2,
        ["planner.static_degree=8", "4 ranks"],
    ),
    "config: ep_size not dividing the world": (
        ("config", "--config", TINY[0], "--moe.num_experts=6", "--moe.ep_size=3"),
        2,
        ["moe.ep_size=3", "4 ranks"],
    ),
    "config: jsonl file missing": (
        ("config", "--config", TINY[0], "--data.source=jsonl", "--data.path={tmp}/nowhere.jsonl"),
        1,
        ["nowhere.jsonl"],
    ),
    "cost model: unknown preset": ((*T, "--planner.cost_model=tiny-cpux"), 2, ["planner.cost_model", "tiny-cpu"]),
    "cost model: missing file": ((*T, "--planner.cost_model={tmp}/none.json"), 2, ["none.json", "does not exist"]),
    "cost model: broken JSON file": ((*T, "--planner.cost_model={tmp}/cost.json"), 2, ["cost.json"]),
    "run_dir under a file": ((*T, "--train.run_dir={tmp}/a-file/run"), 2, ["train.run_dir", "a-file"]),
    "run_dir that cannot be written (/proc)": ((*T, "--train.run_dir=/proc/seqmoe-run"), 2, ["cannot be written"]),
    "resume from a missing checkpoint": ((*T, "--train.resume={tmp}/nope"), 2, ["train.resume", "no such folder"]),
    "plan --plot under a file": (
        ("plan", "--steps=1", "--batch-size=8", "--plot={tmp}/a-file/plots/plan.png"),
        2,
        ["--plot", "a-file is a file"],
    ),
    "plan --plot onto a folder": (("plan", "--steps=1", "--batch-size=8", "--plot={tmp}"), 2, ["is a folder"]),
    "inconsistent launcher environment": ((*T,), 1, ["RANK", "WORLD_SIZE"]),
}
CASE_ENV = {"inconsistent launcher environment": {"RANK": "3", "WORLD_SIZE": "4"}}


def _expand(args: tuple[str, ...], tmp_path: Path, run: Path) -> list[str]:
    out = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[:1] in (("train",), ("config",)) and not any(a.startswith("--train.run_dir") for a in out):
        out.append(f"--train.run_dir={run}")
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    _files(folder)
    return folder


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_loses_nothing(case, inputs, tmp_path):
    args, code, phrases = CASES[case]
    shutil.copytree(inputs, tmp_path, dirs_exist_ok=True)
    run = tmp_path / "run"
    before = snapshot(tmp_path)
    argv = _expand(args, tmp_path, run)
    result = seqmoe(*argv, cwd=tmp_path, env=CASE_ENV.get(case))
    after = snapshot(tmp_path)
    intact = {k: v for k, v in after.items() if k in before} == before and not (run / "metrics.jsonl").exists()
    _record(case, argv, result, intact)
    assert_one_line(result, code, phrases)
    assert intact, "an input file changed or a run started"


# Cases on a folder that already holds a run (history must come out byte for byte the same).
HISTORY_CASES: dict[str, tuple[tuple[str, ...], int, list[str]]] = {
    "fresh run into a folder with history": (
        (*T, "--train.steps=3"),
        2,
        ["already holds a run", "--train.resume=auto", "--train.run_dir", "--train.overwrite=true"],
    ),
    "resume after changing model.d_model": (
        (*T, "--train.steps=3", "--train.resume=auto", "--model.d_model=64"),
        2,
        ["model.d_model=32", "64", "nothing was changed"],
    ),
    "resume after changing the ZeRO stage": (
        (*T, "--train.steps=3", "--train.resume=auto", "--train.zero_stage=0"),
        2,
        ["train.zero_stage=1"],
    ),
    "resume after changing moe.num_experts": (
        (*T, "--train.steps=3", "--train.resume=auto", "--moe.num_experts=4"),
        2,
        ["moe.num_experts=8"],
    ),
    "resume with another rank count (seqmoe config, 2 ranks)": (
        ("config", "--config", *TINY, "--launch.nproc_per_node=2", "--train.resume=auto"),
        2,
        ["written by 1 ranks", "this job has 2"],
    ),
    "resume=auto with history but no finished checkpoint": (
        (*T, "--train.steps=3", "--train.resume=auto"),
        2,
        ["no usable checkpoint", "--train.overwrite=true"],
    ),
    "folder locked by a live run": ((*T, "--train.steps=3", "--train.resume=auto"), 2, ["in use by another run"]),
    "disk without room for a checkpoint": ((*T, "--train.steps=3", "--train.resume=auto"), 2, ["MiB free"]),
}


def _prepare(case: str, run: Path):
    """Per-case changes to the copied run folder; returns something to keep alive during the run."""
    if case == "resume=auto with history but no finished checkpoint":
        for manifest in run.glob("checkpoints/*/manifest.json"):
            manifest.unlink()  # as if every save had been cut short
    if case == "folder locked by a live run":
        lock = run / ".lock"
        lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
        handle = lock.open("rb")
        fcntl.flock(handle, fcntl.LOCK_EX)
        return handle
    return None


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return result.returncode == 0


@pytest.mark.parametrize("case", list(HISTORY_CASES))
def test_bad_input_on_a_run_folder_leaves_its_history_intact(case, trained, tmp_path):
    args, code, phrases = HISTORY_CASES[case]
    mount = None
    if case == "disk without room for a checkpoint":
        mount = tmp_path / "small-disk"
        if not _tmpfs(mount, "2m"):
            pytest.skip("needs root and mount to make a small tmpfs")
        run = mount / "run"
        shutil.copytree(trained, run, ignore=shutil.ignore_patterns("*.pt", "ds"))
    else:
        run = _copy_run(trained, tmp_path)
    try:
        keep = _prepare(case, run)
        before = snapshot(run)
        argv = _expand(args, tmp_path, run)
        result = seqmoe(*argv, cwd=tmp_path)
        _record(case, argv, result, snapshot(run) == before)
        assert_one_line(result, code, phrases)
        assert snapshot(run) == before, "the run folder changed"
        del keep
    finally:
        if mount is not None:
            subprocess.run(["umount", str(mount)], check=False)


def test_overwrite_moves_the_old_run_aside(trained, tmp_path):
    """--train.overwrite=true keeps the old files, byte for byte, in overwritten-<time>/."""
    run = _copy_run(trained, tmp_path)
    before = snapshot(run)
    result = seqmoe("train", *TINY, "--train.steps=1", "--train.overwrite=true", f"--train.run_dir={run}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (moved,) = run.glob("overwritten-*")
    assert snapshot(moved) == {k: v for k, v in before.items() if not k.startswith(".")}
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0]
    assert not (run / ".lock").exists()


# In-process: the writers never leave a half-written file (a full disk is simulated).


def test_a_full_disk_keeps_the_old_plot_and_whole_metric_lines(tmp_path, monkeypatch):
    from runtime import outputs

    out = outputs.RunOutputs(tmp_path, start_step=0)
    row = {
        "step": 0,
        "loss": 1.0,
        "grad_norm": 1.0,
        "tokens": 1,
        "step_time_s": 1.0,
        "plan": {"microbatches": 1, "degrees": {"1": 1}, "predicted_time_s": 1.0, "solve_time_s": 0.0},
    }
    out.log(row)
    out.plot()
    old_png, old_metrics = (tmp_path / "loss.png").read_bytes(), (tmp_path / "metrics.jsonl").read_bytes()
    assert old_png

    class FullDisk:
        """A file on a disk that fills up halfway through the next write."""

        def __init__(self, real):
            self.real = real

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.real.close()

        def tell(self):
            return self.real.tell()

        def truncate(self, size):
            return self.real.truncate(size)

        def write(self, data):
            self.real.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    real_open = Path.open
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: FullDisk(real_open(self, *a, **k)))
    with pytest.raises(OSError):
        out.log(dict(row, step=1))
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == old_metrics  # no half line
    import matplotlib.figure

    def no_room(self, fname, **kwargs):
        Path(fname).write_bytes(b"")  # the file is created, then nothing fits
        raise OSError(errno.ENOSPC, "No space left on device", str(fname))

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", no_room)
    with pytest.raises(OSError):
        out.plot()
    assert (tmp_path / "loss.png").read_bytes() == old_png  # not a 0-byte loss.png
    assert not list(tmp_path.glob(".*.tmp"))
    out.tb.close()


def test_stale_lock_is_taken_over_and_a_live_one_refuses(tmp_path):
    from runtime.run_dir import RunDirError, RunLock

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"pid": int(dead.stdout), "host": socket.gethostname(), "since": time.time()}
    (tmp_path / ".lock").write_text(json.dumps(info))
    with RunLock(tmp_path) as lock:
        assert "stale lock" in (lock.note or "")
        with pytest.raises(RunDirError, match="in use by another run"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()


# Through `seqmoe launch` with 2 ranks: the message once, no torchrun report.


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    [
        ("jsonl lone surrogate", ("--data.source=jsonl", "--data.path={tmp}/surrogate.jsonl"), 1, ["lone surrogate"]),
        ("nproc_per_node=3", ("--launch.nproc_per_node=3",), 2, ["3 ranks", "power-of-two"]),
        ("fresh run into a folder with history", (), 2, ["already holds a run"]),
    ],
    ids=lambda c: c[0],
)
def test_launch_prints_the_error_once(case, trained, inputs, tmp_path):
    name, extra, code, phrases = case
    shutil.copytree(inputs, tmp_path, dirs_exist_ok=True)
    run = _copy_run(trained, tmp_path) if "history" in name else tmp_path / "run"
    before = snapshot(tmp_path)
    args = ["launch", *TINY, "--launch.nproc_per_node=2", *extra, f"--train.run_dir={run}", "--parallel.timeout_s=60"]
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    result = seqmoe(*argv, cwd=tmp_path, timeout=300)
    intact = {k: v for k, v in snapshot(tmp_path).items() if k in before} == before
    _record(f"launch, 2 ranks: {name}", argv, result, intact)
    assert_one_line(result, code, phrases)
    assert "ChildFailedError" not in result.stderr
    assert intact


@pytest.mark.slow
def test_sigint_saves_a_checkpoint_and_says_how_to_resume(tmp_path):
    """Ctrl-C in a single-process `seqmoe train`: the step finishes, a checkpoint of it is written,
    one line says how to resume, exit code 75 (EX_TEMPFAIL); the resume continues from there."""
    run = tmp_path / "run"
    args = [*TINY, "--train.steps=40", "--train.checkpoint_every=0", f"--train.run_dir={run}"]
    process = subprocess.Popen(
        [str(SEQMOE), "train", *args],
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and process.poll() is None:
        metrics = run / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("train:")]
    assert process.returncode == 75, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and "stopped by SIGINT" in lines[0] and "--train.resume=auto" in lines[0], lines
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert (run / "checkpoints" / f"step_{steps[-1] + 1:06d}" / "manifest.json").is_file()  # none lost
    assert not (run / ".lock").exists()
    resumed = seqmoe(
        "train", *TINY, f"--train.steps={steps[-1] + 2}", "--train.resume=auto", f"--train.run_dir={run}", cwd=tmp_path
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert again == list(range(steps[-1] + 2))  # no step twice, none missing
