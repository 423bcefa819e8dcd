"""Checkpoints: DeepSpeed model/optimizer/scheduler state plus what makes a resume exact.

Layout under ``<run dir>/checkpoints/``::

    step_000040/            one finished checkpoint (DeepSpeed's files under ds/)
        ds/...              engine.save_checkpoint (every rank writes its part)
        rank<r>.pt          this rank's RNG states (tensors and plain numbers: runtime/rng_state.py)
        manifest.json       written last by rank 0: step, world size, every file's bytes and SHA-256

Writing is atomic: every rank writes (and fsyncs) into ``.tmp-step_000040``; the ranks agree that
every write succeeded, then rank 0 hashes every file, writes and fsyncs the manifest and renames
the folder. A job killed mid-save leaves only a ``.tmp-*`` folder, which is ignored and removed
later; a write that fails (a full disk) on any rank removes the temporary folder on every rank and
stops the run with :class:`CheckpointError`, the previous checkpoints untouched.

Loading is safe against a checkpoint from someone else (runtime/safe_load.py): the manifest is
JSON; rank 0 checks every file's SHA-256 before any file is deserialised; every rank then reads
each file once, re-checks its hash on the bytes it unpickles, and unpickles them weights-only
(DeepSpeed's loader too, through a replaced checkpoint engine). A checkpoint without SHA-256
checksums (an older seqmoe's) is refused. With ``resume='auto'`` a partial or corrupt checkpoint
(also one whose file changed while it was read) is reported in one line and the previous one
used; a file that is not a weights-only pickle stops the run: it is refused, never run.
The data position needs no state: step i's batch depends only on (seed, i).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from parallel.context import ParallelContext
from runtime import faults, rng_state
from runtime.config import ConfigError
from runtime.safe_load import (
    ChecksumMismatch,
    UnsafeCheckpoint,
    install_safe_engine,
    load_verified,
    save_durable,
    sha256_file,
)

__all__ = ["CheckpointError", "check_checkpoint", "find_latest_valid", "load_checkpoint", "save_checkpoint"]

MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, or was refused when loading; the message says which and why."""


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _barrier(ctx: ParallelContext) -> None:
    if ctx.world_size > 1:
        dist.barrier(group=ctx.world)


def _gather(ctx: ParallelContext, value):
    """Every rank's ``value``, on every rank."""
    if ctx.world_size == 1:
        return [value]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, value, group=ctx.world)
    return out


def _from_rank0(ctx: ParallelContext, value):
    box = [value]
    if ctx.world_size > 1:
        dist.broadcast_object_list(box, src=0, group=ctx.world)
    return box[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    engine, ctx: ParallelContext, root: Path, step: int, *, keep: int, meta: dict | None = None
) -> Path:
    """Write checkpoint ``step`` (the number of finished steps) atomically; keep the last ``keep``.
    Raises CheckpointError on every rank when any rank could not write its part."""
    name = f"step_{step:06d}"
    final, tmp = root / name, root / f".tmp-{name}"
    safe = install_safe_engine(engine)
    safe.write_error, safe.inject = None, faults.checkpoint_write_error(ctx.rank, step)
    error = None
    if ctx.rank == 0:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        except OSError as exc:
            error = exc
    failed = _from_rank0(ctx, None if error is None else f"rank 0: {error}")
    if failed is None:
        try:  # DeepSpeed's own writes go through ``safe``; this catches what it writes itself (a script copy)
            engine.save_checkpoint(str(tmp), tag="ds", save_latest=False)
        except OSError as exc:
            safe.write_error = safe.write_error or exc
        if safe.write_error is None:
            try:
                save_durable(rng_state.capture() | {"step": step}, tmp / f"rank{ctx.rank}.pt")
            except OSError as exc:
                safe.write_error = exc
        mine = None if safe.write_error is None else str(safe.write_error)
        failures = [f"rank {r}: {e}" for r, e in enumerate(_gather(ctx, mine)) if e]
        failed = failures[0] if failures else None
        if failed is None and ctx.rank == 0:
            try:
                _publish(tmp, final, step, ctx.world_size, meta)
            except OSError as exc:
                failed = f"rank 0: {exc}"
        failed = _from_rank0(ctx, failed)
    safe.write_error = safe.inject = None
    if failed is not None:
        if ctx.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier(ctx)
        previous = sorted(p.name for p in root.glob("step_*") if (p / MANIFEST).exists())
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(
            f"checkpoint {name} not written ({failed}); {kept}; free space under {root} and resume with "
            "--train.resume=auto"
        )
    if ctx.rank == 0:
        _prune(root, keep)
    _barrier(ctx)
    return final


def _publish(tmp: Path, final: Path, step: int, world_size: int, meta: dict | None = None) -> None:
    """Hash every file, write the manifest, and rename ``tmp`` to ``final``, each step on the disk."""
    files = {str(p.relative_to(tmp)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(tmp)}
    # meta (run_dir.checkpoint_meta: ZeRO stage, model shape) lets a resume check the fit first
    manifest = {**(meta or {}), "step": step, "world_size": world_size, "hash": "sha256", "files": files}
    with (tmp / MANIFEST).open("w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    for folder in sorted({p.parent for p in _files(tmp)} | {tmp}, key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    old = final.parent / f".old-{final.name}"
    if final.exists():  # the same step saved again (a restart redid it): swap, then drop the old one
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def _prune(root: Path, keep: int) -> None:
    finished = sorted(p for p in root.glob("step_*") if (p / MANIFEST).exists())
    for old in finished[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [*root.glob(".tmp-step_*"), *root.glob(".old-step_*")]:
        shutil.rmtree(stale, ignore_errors=True)


def _verify(folder: Path, world_size: int) -> tuple[str | None, dict[str, str]]:
    """(None, {relative path: sha256}) if ``folder`` is a complete checkpoint, else (the reason, {})."""
    manifest_path = folder / MANIFEST
    if not manifest_path.exists():
        return "no manifest.json (the save did not finish)", {}
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not all(isinstance(meta, dict) and "sha256" in meta for meta in files.values()):
            return "manifest.json has no SHA-256 checksums (an older seqmoe wrote it); refused", {}
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        return f"unreadable manifest.json ({exc})", {}
    if manifest.get("world_size") != world_size:
        return f"written by {manifest.get('world_size')} ranks, this job has {world_size}", {}
    for rel, meta in files.items():
        path = folder / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"manifest.json names a file outside the checkpoint ({rel!r})", {}
        if not path.is_file():
            return f"missing file {rel}", {}
        if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
            return f"file {rel} does not match its SHA-256 checksum (corrupt or truncated)", {}
    return None, {rel: meta["sha256"] for rel, meta in files.items()}


def check_checkpoint(folder: Path, world_size: int) -> str | None:
    """None if ``folder`` is a complete checkpoint for ``world_size`` ranks, else the reason."""
    return _verify(folder, world_size)[0]


def find_latest_valid(root: Path, world_size: int, report=print, skip: tuple[str, ...] = ()) -> Path | None:
    """The newest valid checkpoint under ``root`` (not in ``skip``); each skipped one is reported."""
    for folder in sorted(root.glob("step_*"), reverse=True):
        if str(folder) in skip:
            continue
        reason = check_checkpoint(folder, world_size)
        if reason is None:
            return folder
        report(f"checkpoint {folder} skipped: {reason}; trying the previous one")
    return None


def _choose(ctx: ParallelContext, resume: str, root: Path, tried: list[str], report) -> tuple:
    """Rank 0 picks (folder, {file: sha256}, error); every rank gets the same answer."""
    choice = (None, {}, None)
    if ctx.rank == 0:
        if resume == "auto":
            folder = find_latest_valid(root, ctx.world_size, report, skip=tuple(tried))
            choice = (None, {}, None) if folder is None else (str(folder), _verify(folder, ctx.world_size)[1], None)
        else:
            reason, files = _verify(Path(resume), ctx.world_size) if Path(resume).is_dir() else ("no such folder", {})
            if reason is None:
                choice = (resume, files, None)
            else:
                choice = (None, {}, f"train.resume={resume!r}: {reason}; pass a valid checkpoint folder or 'auto'")
    return _from_rank0(ctx, choice)


def _load_from(engine, ctx: ParallelContext, folder: Path, files: dict[str, str]) -> tuple[str, str] | None:
    """Load ``folder`` on this rank; None, or (kind, message) with kind 'corrupt' or 'unsafe'."""
    safe = install_safe_engine(engine)
    safe.expected = {os.path.abspath(folder / rel): sha for rel, sha in files.items()}
    rank_file = f"rank{ctx.rank}.pt"
    try:
        if rank_file not in files:
            return "corrupt", f"manifest.json lists no {rank_file}"
        load_path, _ = engine.load_checkpoint(str(folder), tag="ds", load_module_strict=True)
        if load_path is None:
            return "corrupt", f"DeepSpeed found no checkpoint under {folder / 'ds'}"
        state = load_verified(folder / rank_file, files[rank_file], name=str(folder / rank_file))
        rng_state.restore(state)
    except ChecksumMismatch as exc:
        return "corrupt", str(exc)
    except UnsafeCheckpoint as exc:
        return "unsafe", str(exc)
    finally:
        safe.expected = {}
    return None


def load_checkpoint(engine, ctx: ParallelContext, resume: str, root: Path, report=print) -> int:
    """Restore from ``resume`` ('auto' = newest valid under ``root``, or a checkpoint folder);
    returns the number of finished steps (0 = nothing to resume). Rank 0 decides, all follow."""
    tried: list[str] = []
    while True:
        folder, files, error = _choose(ctx, resume, root, tried, report)
        if error is not None:
            raise ConfigError(error)
        if folder is None:
            if ctx.rank == 0:
                report(f"resume=auto: no valid checkpoint under {root}; starting from step 0")
            return 0
        problems = [p for p in _gather(ctx, _load_from(engine, ctx, Path(folder), files)) if p is not None]
        if not problems:
            break
        unsafe = [message for kind, message in problems if kind == "unsafe"]
        if unsafe:
            raise CheckpointError(f"checkpoint {folder} refused: {unsafe[0]}")
        if resume != "auto":
            raise ConfigError(f"train.resume={resume!r}: {problems[0][1]}; pass a valid checkpoint folder or 'auto'")
        if ctx.rank == 0:
            report(f"checkpoint {folder} skipped: {problems[0][1]}; trying the previous one")
        tried.append(folder)
    step = int(json.loads((Path(folder) / MANIFEST).read_text())["step"])
    if ctx.rank == 0:
        report(f"resumed from {folder} (step {step})")
    return step
