"""Checkpoints: DeepSpeed model/optimizer/scheduler state plus what makes a resume exact.

Layout under ``<run dir>/checkpoints/``::

    step_000040/            one finished checkpoint (DeepSpeed's files under ds/)
        ds/...              engine.save_checkpoint (every rank writes its part)
        rank<r>.pt          this rank's RNG states
        manifest.json       written last by rank 0: step, files with sizes and CRC-32s

Writing is atomic: every rank writes into ``.tmp-step_000040``; after a barrier rank 0 checks
every file, writes the manifest and renames the folder, so a job killed mid-save leaves only a
``.tmp-*`` folder, which is ignored and removed later. Loading takes the newest checkpoint whose
manifest matches its files; a partial or corrupt one is reported and the previous one used.
The data position needs no state: step i's batch depends only on (seed, i).
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import torch
import torch.distributed as dist

from parallel.context import ParallelContext
from runtime.config import ConfigError

__all__ = ["find_latest_valid", "load_checkpoint", "save_checkpoint"]

MANIFEST = "manifest.json"


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world)


def save_checkpoint(
    engine, ctx: ParallelContext, root: Path, step: int, *, keep: int, meta: dict | None = None
) -> Path:
    """Write checkpoint ``step`` (the number of finished steps) atomically; keep the last ``keep``.
    ``meta`` (run_dir.checkpoint_meta: ranks, ZeRO stage, model shape) goes into the manifest, so a
    resume can tell before loading anything whether the checkpoint fits the job."""
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(ctx)
    engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
    torch.save({"torch": torch.get_rng_state(), "step": step}, tmp / f"rank{ctx.rank}.pt")
    _barrier(ctx)
    if ctx.rank == 0:
        files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "crc32": _crc32(p)} for p in _files(tmp)}
        manifest = {**(meta or {}), "step": step, "world_size": ctx.world_size, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    _barrier(ctx)
    return final


def _prune(root: Path, keep: int) -> None:
    finished = sorted(p for p in root.glob("step_*") if (p / MANIFEST).exists())
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)


def check_checkpoint(folder: Path, world_size: int) -> str | None:
    """None if ``folder`` is a complete checkpoint for ``world_size`` ranks, else the reason."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return "no manifest.json (the save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest.json ({exc})"
    if manifest.get("world_size") != world_size:
        return f"written by {manifest.get('world_size')} ranks, this job has {world_size}"
    for rel, meta in files.items():
        path = folder / rel
        if not path.exists():
            return f"missing file {rel}"
        if path.stat().st_size != meta["bytes"] or _crc32(path) != meta["crc32"]:
            return f"file {rel} does not match its checksum (corrupt or truncated)"
    return None


def find_latest_valid(root: Path, world_size: int, report=print) -> Path | None:
    """The newest valid checkpoint under ``root``; each skipped one is reported with its reason."""
    for folder in sorted(root.glob("step_*"), reverse=True):
        reason = check_checkpoint(folder, world_size)
        if reason is None:
            return folder
        report(f"checkpoint {folder} skipped: {reason}; trying the previous one")
    return None


def load_checkpoint(engine, ctx: ParallelContext, resume: str, root: Path, report=print) -> int:
    """Restore from ``resume`` ('auto' = newest valid under ``root``, or a checkpoint folder);
    returns the number of finished steps (0 = nothing to resume). Rank 0 decides, all follow."""
    choice = [None, None]  # [folder, error]: rank 0 decides, every rank follows (or raises)
    if ctx.rank == 0:
        if resume == "auto":
            folder = find_latest_valid(root, ctx.world_size, report)
            choice[0] = None if folder is None else str(folder)
        else:
            reason = check_checkpoint(Path(resume), ctx.world_size) if Path(resume).is_dir() else "no such folder"
            if reason is None:
                choice[0] = resume
            else:
                choice[1] = f"train.resume={resume!r}: {reason}; pass a valid checkpoint folder or 'auto'"
    if ctx.world_size > 1:
        dist.broadcast_object_list(choice, src=0, group=ctx.world)
    if choice[1] is not None:
        raise ConfigError(choice[1])
    if choice[0] is None:
        if ctx.rank == 0:
            report(f"resume=auto: no valid checkpoint under {root}; starting from step 0")
        return 0
    folder = Path(choice[0])
    engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)
    state = torch.load(folder / f"rank{ctx.rank}.pt", weights_only=False)
    torch.set_rng_state(state["torch"])
    if ctx.rank == 0:
        report(f"resumed from {folder} (step {state['step']})")
    return int(state["step"])
