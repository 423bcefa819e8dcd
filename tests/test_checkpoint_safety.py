"""Loading a checkpoint never runs code from it (runtime/safe_load.py, runtime/checkpoint.py).

The attack: a checkpoint file whose pickle has an object with ``__reduce__`` returning
``os.system("touch MARKER")``. ``torch.load(weights_only=False)`` would run it (checked first, so
the test can fail); seqmoe's loaders must refuse it with one clear line and the marker must not
exist, for seqmoe's own RNG file and for a DeepSpeed model-states file, also when the attacker
rewrote the manifest so that its SHA-256 checksums match the payload.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from runtime import rng_state
from runtime.safe_load import ChecksumMismatch, SafeCheckpointEngine, UnsafeCheckpoint, load_verified
from tests.test_bad_inputs import SEQMOE, TINY
from tests.test_launchers import job_env


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _write_payload(path: Path, marker: Path) -> str:
    """A torch.save file that looks like an RNG/model state but carries the payload; its SHA-256."""
    torch.save({"torch": torch.zeros(3), "module": Payload(marker), "step": 2}, path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_payload_is_live(path: Path, marker: Path) -> None:
    """The crafted file does run code when unpickled unsafely: the refusals below are real."""
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()


def test_rank_file_with_code_payload_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "rank0.pt"
    sha = _write_payload(path, marker)
    _assert_payload_is_live(path, marker)
    with pytest.raises(UnsafeCheckpoint, match="rank0.pt is not a weights-only pickle.*refused"):
        load_verified(path, sha)
    assert not marker.exists()
    # a wrong checksum is refused before the bytes are unpickled at all
    with pytest.raises(ChecksumMismatch, match="rank0.pt does not match its manifest checksum"):
        load_verified(path, "0" * 64)
    assert not marker.exists()


def test_deepspeed_model_file_with_code_payload_is_refused_without_running(tmp_path):
    marker, path = tmp_path / "pwned", tmp_path / "mp_rank_00_model_states.pt"
    sha = _write_payload(path, marker)
    _assert_payload_is_live(path, marker)
    engine = SafeCheckpointEngine(None)
    with pytest.raises(ChecksumMismatch, match="does not list"):  # a file the manifest does not name
        engine.load(str(path), map_location="cpu")
    engine.expected = {os.path.abspath(path): sha}
    with pytest.raises(UnsafeCheckpoint, match="mp_rank_00_model_states.pt is not a weights-only pickle"):
        engine.load(str(path), map_location="cpu")
    assert not marker.exists()


def test_rng_state_round_trips_and_loads_weights_only(tmp_path):
    random.seed(5), np.random.seed(6), torch.manual_seed(7)
    random.random(), np.random.normal(), torch.rand(3)  # states mid-stream, numpy with a cached gaussian
    path = tmp_path / "rank0.pt"
    torch.save(rng_state.capture(), path)
    expected = (random.random(), float(np.random.normal()), torch.rand(3))
    rng_state.restore(torch.load(path, weights_only=True))
    assert (random.random(), float(np.random.normal())) == expected[:2]
    assert torch.equal(torch.rand(3), expected[2])


def _train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [
        str(SEQMOE),
        "train",
        *TINY,
        "--train.checkpoint_every=2",
        f"--train.run_dir={run_dir}",
        *extra,
    ]
    return subprocess.run(command, env=job_env(), capture_output=True, text=True, timeout=600, cwd=run_dir.parent)


def _forge(checkpoint: Path, rel: str, marker: Path) -> None:
    """Replace ``rel`` with the payload and rewrite the manifest so its checksum matches."""
    sha = _write_payload(checkpoint / rel, marker)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][rel] = {"bytes": (checkpoint / rel).stat().st_size, "sha256": sha}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One 2-step run with its step-2 checkpoint, trained once for the module: each case forges copies."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    first = _train(run_dir, "--train.steps=2")
    assert first.returncode == 0, first.stderr[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("rel", ["rank0.pt", "ds/mp_rank_00_model_states.pt"])
def test_resume_refuses_a_forged_checkpoint_without_running_it(tmp_path, rel, trained_run):
    run_dir, marker, pristine = tmp_path / "run", tmp_path / "pwned", trained_run
    shutil.copytree(pristine, run_dir)
    checkpoint = run_dir / "checkpoints" / "step_000002"
    # the payload without a matching manifest: the checksum check skips the checkpoint, nothing is
    # unpickled; with no other checkpoint the resume refuses (the run folder keeps its history)
    _write_payload(checkpoint / rel, marker)
    skipped = _train(run_dir, "--train.steps=3", "--train.resume=auto")
    assert not marker.exists()
    assert skipped.returncode == 2, skipped.stderr[-3000:]
    lines = [line for line in skipped.stderr.splitlines() if line.startswith("seqmoe train:")]
    assert len(lines) == 1 and "no usable checkpoint" in lines[0], lines
    assert f"{rel} does not match its SHA-256 checksum" in lines[0], lines
    # the attacker also rewrote the manifest: the weights-only load refuses it
    run_dir2 = tmp_path / "run2"
    shutil.copytree(pristine, run_dir2)
    _forge(run_dir2 / "checkpoints" / "step_000002", rel, marker)
    refused = _train(run_dir2, "--train.steps=3", "--train.resume=auto")
    assert not marker.exists()
    assert refused.returncode == 1, refused.stdout[-2000:] + refused.stderr[-3000:]
    lines = [line for line in refused.stderr.splitlines() if line.startswith("seqmoe train:")]
    assert len(lines) == 1 and "refused" in lines[0] and f"{rel} is not a weights-only pickle" in lines[0], lines
