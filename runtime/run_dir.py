"""A run folder belongs to one run (DESIGN invariant 9).

Before a run writes anything, rank 0 decides, from what the folder already holds, what this run
may do with it (``open_run_folder``):

- a fresh run (``train.resume`` empty) into a folder with history (a non-empty metrics.jsonl or
  a checkpoint) refuses, naming ``--train.resume=auto``, a new ``--train.run_dir`` and
  ``--train.overwrite=true``; the last moves the old history into ``overwritten-<time>/``
  inside the folder (nothing is deleted);
- a resume first checks each checkpoint's manifest against this job (ranks, expert-parallel
  size, ZeRO stage, model and MoE shapes) and stops with one line, touching nothing, when the
  checkpoint cannot be loaded exactly; a resume that finds history but no usable checkpoint
  stops too, instead of starting again from step 0 over the old metrics;
- a lock file (``.lock``: created with O_EXCL, held with ``flock``, pid + host + time inside)
  keeps a second run out while this one lives; a lock whose process is gone is stale and is
  taken over with a note.

The verdict travels from rank 0 to every rank, so all ranks fail with the same line or go on.
Checkpoint files themselves are written and checked by runtime/checkpoint.py.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from runtime.checkpoint import MANIFEST, check_checkpoint
from runtime.config import Config, ConfigError

__all__ = [
    "RunDirError",
    "RunLock",
    "checkpoint_meta",
    "describe_history",
    "open_run_folder",
    "plan_resume",
]

LOCK_NAME = ".lock"
HISTORY_FILES = ("metrics.jsonl", "checkpoints", "tensorboard", "loss.png", "plan.png", "config.toml")
# model fields that change no parameter's shape and no state a checkpoint holds
MODEL_FREE = ("activation_checkpointing",)
MOE_SHAPED = ("num_experts", "router", "router_dim", "chain_iterations", "shared_expert", "ep_size")


class RunDirError(ConfigError):
    """The run folder cannot be used by this run as asked; the message says what to pass instead."""


# ---------------------------------------------------------------------------------------------
# What the folder holds.
# ---------------------------------------------------------------------------------------------


def _metric_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_bytes().splitlines():
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill mid-write
    return steps


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / "checkpoints"
    return sorted(root.glob("step_*")) if root.is_dir() else []


def describe_history(run_dir: Path) -> str | None:
    """'metrics.jsonl with 12 steps (0-11), checkpoints step_000010' or None for a folder without history."""
    parts = []
    steps = _metric_steps(run_dir)
    if steps:
        parts.append(f"metrics.jsonl with {len(steps)} steps ({min(steps)}-{max(steps)})")
    elif (run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").stat().st_size:
        parts.append("a metrics.jsonl")
    checkpoints = _checkpoints(run_dir)
    if checkpoints:
        parts.append("checkpoints " + ", ".join(p.name for p in checkpoints))
    return ", ".join(parts) or None


def move_aside(run_dir: Path) -> Path:
    """Move the old run's files into ``run_dir/overwritten-<UTC time>/``; returns that folder."""
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    target = run_dir / f"overwritten-{stamp}"
    n = 1
    while target.exists():
        target, n = run_dir / f"overwritten-{stamp}-{n}", n + 1
    target.mkdir()
    for name in HISTORY_FILES:
        if (run_dir / name).exists():
            os.replace(run_dir / name, target / name)
    return target


# ---------------------------------------------------------------------------------------------
# Checkpoint compatibility, checked from the manifest before DeepSpeed loads anything.
# ---------------------------------------------------------------------------------------------


def checkpoint_meta(config: Config, world_size: int) -> dict:
    """What a checkpoint must agree on with the job that loads it (stored in its manifest)."""
    model = {k: v for k, v in dataclasses.asdict(config.model).items() if k not in MODEL_FREE}
    moe = {k: getattr(config.moe, k) for k in MOE_SHAPED} if config.model.ffn == "moe" else {}
    return {"world_size": world_size, "zero_stage": config.train.zero_stage, "model": model, "moe": moe}


def _read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def incompatibility(manifest: dict, current: dict, fallback_model: dict | None = None) -> str | None:
    """Why a checkpoint with ``manifest`` cannot be loaded by a job with ``current`` meta, or None."""
    if manifest.get("world_size") != current["world_size"]:
        return f"it was written by {manifest.get('world_size')} ranks and this job has {current['world_size']}"
    for key in ("zero_stage",):
        if key in manifest and manifest[key] != current[key]:
            return f"it was written with train.{key}={manifest[key]} and this job has {current[key]}"
    for section in ("model", "moe"):
        old = manifest.get(section, fallback_model.get(section) if fallback_model else None)
        if old is None:
            continue  # written before manifests carried the config, and no config.toml to compare
        for key, now in current[section].items():
            if key in old and _plain(old[key]) != _plain(now):
                return f"it was written with {section}.{key}={old[key]!r} and this job has {now!r}"
    return None


def _plain(value):
    return list(value) if isinstance(value, tuple | list) else value


def _old_config(run_dir: Path) -> dict | None:
    """model/moe sections of the config.toml the folder's last run wrote (for old manifests)."""
    import tomllib

    try:
        data = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return {"model": data.get("model", {}), "moe": data.get("moe", {})}


# ---------------------------------------------------------------------------------------------
# The decision.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResumePlan:
    checkpoint: str | None
    """The checkpoint folder to load (already checked), or None to start at step 0."""
    notes: tuple[str, ...] = ()
    """Lines for the log (skipped checkpoints, history moved aside, stale lock)."""


def _fix(run_dir: Path) -> str:
    return (
        f"resume it with --train.resume=auto, write this run elsewhere with --train.run_dir=NEW_FOLDER, or pass "
        f"--train.overwrite=true to move the old files into {run_dir}/overwritten-<time>/"
    )


def plan_resume(config: Config, world_size: int, *, restarted: bool = False, dry_run: bool = False) -> ResumePlan:
    """What this run may do with its folder (see the module docstring); raises RunDirError.
    ``dry_run`` (``seqmoe config``, the CLI's early check): decide from the manifests alone (no
    checksums) and move nothing aside."""
    t, run_dir = config.train, config.resolved_run_dir
    resume = t.resume or ("auto" if restarted else "")
    history = describe_history(run_dir)
    if not resume:
        if history is None:
            return ResumePlan(None)
        if not t.overwrite:
            raise RunDirError(f"run folder {run_dir} already holds a run ({history}); {_fix(run_dir)}")
        return ResumePlan(None, (_overwrite_note(run_dir, dry_run),))
    current = checkpoint_meta(config, world_size)
    fallback = _old_config(run_dir)
    if resume != "auto":
        folder = Path(resume)
        manifest = _read_manifest(folder) if folder.is_dir() else None
        if manifest is not None:
            reason = incompatibility(manifest, current, fallback)
            if reason:
                raise RunDirError(f"train.resume={resume!r} cannot be loaded exactly: {reason}; {_restore_hint()}")
        return ResumePlan(resume)  # load_checkpoint checks the files and reports a bad folder
    notes = []
    for folder in reversed(_checkpoints(run_dir)):
        manifest = _read_manifest(folder)
        if manifest is not None:
            reason = incompatibility(manifest, current, fallback)
            if reason:
                raise RunDirError(
                    f"cannot resume {run_dir} from {folder.name}: {reason}; {_restore_hint()}, or start a new run "
                    "with --train.run_dir=NEW_FOLDER (nothing was changed)"
                )
        reason = check_checkpoint(folder, world_size) if not dry_run or manifest is None else None
        if reason is None and manifest is None:
            reason = "no manifest.json (the save did not finish)"
        if reason is None:
            return ResumePlan(str(folder), tuple(notes))
        notes.append(f"checkpoint {folder} skipped: {reason}; trying the previous one")
    if history is not None and not restarted and not t.overwrite:
        raise RunDirError(
            f"train.resume=auto: run folder {run_dir} holds {history} but no usable checkpoint to resume from; "
            "pass --train.overwrite=true to start it again from step 0 (the old files are moved aside), or use "
            "--train.run_dir=NEW_FOLDER"
        )
    if history is not None and t.overwrite and not restarted:
        notes.append(_overwrite_note(run_dir, dry_run))
    notes.append(f"resume=auto: no checkpoint under {run_dir / 'checkpoints'}; starting from step 0")
    return ResumePlan(None, tuple(notes))


def _overwrite_note(run_dir: Path, dry_run: bool) -> str:
    if dry_run:
        return f"train.overwrite=true: the old run's files will be moved to {run_dir}/overwritten-<time>/"
    return f"train.overwrite=true: the old run's files moved to {move_aside(run_dir)}"


def _restore_hint() -> str:
    return "run it with the settings it was written with (see config.toml next to it)"


# ---------------------------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock_free(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)  # closing releases a lock we took
    return True


class RunLock:
    """``<run dir>/.lock`` while a run lives: O_EXCL create, flock held, pid/host/time inside."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_NAME
        self._fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> RunLock:
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if not self._stale(holder):
                    raise RunDirError(self._busy(holder)) from None
                self.note = f"removed the stale lock of a run that is gone ({self._who(holder)})"
                self.path.unlink(missing_ok=True)
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
            os.write(fd, json.dumps(info).encode())
            self._fd = fd
            return self
        raise RunDirError(f"could not take the lock {self.path}: other runs keep creating it; retry")

    def check(self) -> None:
        """Raise the lock's RunDirError if a live run holds it now (read-only; no lock taken)."""
        if self.path.exists():
            holder = self._holder()
            if not self._stale(holder):
                raise RunDirError(self._busy(holder))

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _stale(self, holder: dict) -> bool:
        if not holder:
            # unreadable or still empty: the creator may be between create and write
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return True
            return age > 10 and _flock_free(self.path)
        if holder.get("host") != socket.gethostname():
            return False  # another machine: its process cannot be seen from here
        return not _pid_alive(int(holder.get("pid", -1))) or _flock_free(self.path)

    @staticmethod
    def _who(holder: dict) -> str:
        if not holder:
            return "unknown process"
        since = datetime.datetime.fromtimestamp(holder.get("since", 0), datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        return f"pid {holder.get('pid')} on {holder.get('host')} since {since}"

    def _busy(self, holder: dict) -> str:
        return (
            f"run folder {self.path.parent} is in use by another run ({self._who(holder)}); wait for it to finish, "
            f"use --train.run_dir=NEW_FOLDER, or delete {self.path} if that run is gone"
        )


# ---------------------------------------------------------------------------------------------
# Rank 0 decides, every rank follows.
# ---------------------------------------------------------------------------------------------


def open_run_folder(ctx, config: Config, *, restarted: bool, report=print) -> tuple[ResumePlan, RunLock | None]:
    """Rank 0: writability and disk checks, the lock, the resume decision; broadcast to all ranks.
    Returns the plan and (on rank 0) the held lock, which the caller releases."""
    from runtime.preflight import check_run_folder

    verdict: list = [None, None]  # [ResumePlan fields, error]
    lock = None
    if ctx.rank == 0:
        try:
            check_run_folder(config, ctx.world_size, room=False)  # room: checked by early_checks
            lock = RunLock(config.resolved_run_dir).acquire()
            plan = plan_resume(config, ctx.world_size, restarted=restarted)
            notes = ((lock.note,) if lock.note else ()) + plan.notes
            verdict[0] = (plan.checkpoint, notes)
        except (RunDirError, OSError) as exc:
            if lock is not None:
                lock.release()
            if isinstance(exc, OSError) and not isinstance(exc, RunDirError):
                exc = RunDirError(_os_message(exc, config.resolved_run_dir))
            verdict[1] = str(exc)
    if ctx.world_size > 1:
        dist.broadcast_object_list(verdict, src=0, group=ctx.world)
    if verdict[1] is not None:
        raise RunDirError(verdict[1])
    checkpoint, notes = verdict[0]
    if ctx.rank == 0:
        for line in notes:
            report(line)
    return ResumePlan(checkpoint, notes), lock


def _os_message(exc: OSError, run_dir: Path) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left under {run_dir} ({exc.strerror}); free some space or use --train.run_dir=NEW_FOLDER"
    return f"run folder {run_dir}: {exc.strerror or exc} ({exc.filename}); use --train.run_dir=A_WRITABLE_FOLDER"


class RunFolder:
    """What ``train`` holds while it runs: the preflight verdict, the lock (rank 0), the signal
    handlers, and the checkpoint to resume from (``checkpoint``; None = step 0)."""

    def __init__(self, ctx, config: Config, report=print):
        self.ctx, self.config, self.report = ctx, config, report
        self.meta = checkpoint_meta(config, ctx.world_size)
        self.checkpoint: str | None = None
        self._lock: RunLock | None = None
        from runtime.signals import GracefulStop

        self.stop = GracefulStop()

    def __enter__(self) -> RunFolder:
        from runtime.preflight import check_files, check_ranks, resolve_cost

        # deterministic checks: every rank reaches the same verdict without talking
        check_files(self.config)
        check_ranks(self.config, self.ctx.world_size, resolve_cost(self.config, self.ctx.world_size))
        # a torchrun elastic restart (a rank died) resumes from the last checkpoint by itself
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        if restarts and self.ctx.rank == 0:
            self.report(f"elastic restart #{restarts}: resuming from the last checkpoint")
        plan, self._lock = open_run_folder(self.ctx, self.config, restarted=restarts > 0, report=self.report)
        self.checkpoint = plan.checkpoint
        self.stop.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.__exit__(*exc)
        if self._lock is not None:
            self._lock.release()

    def save(self, engine, steps_done: int) -> Path:
        """Checkpoint ``steps_done`` with this job's meta in the manifest. A full disk is an OSError
        (ENOSPC) naming the folder; the earlier checkpoints stay intact (saves are atomic)."""
        from runtime.checkpoint import save_checkpoint

        root = self.config.resolved_run_dir / "checkpoints"
        try:
            return save_checkpoint(
                engine, self.ctx, root, steps_done, keep=self.config.train.keep_checkpoints, meta=self.meta
            )
        except (OSError, RuntimeError) as exc:
            # torch.save reports a failed write as a RuntimeError ("file write failed")
            if isinstance(exc, OSError) and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            if isinstance(exc, RuntimeError) and not ("file write failed" in str(exc) or "No space" in str(exc)):
                raise
            tmp = root / f".tmp-step_{steps_done:06d}"
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the last full checkpoint stays
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp)) from None

    def after_step(self, engine, step: int, *, saved: bool) -> None:
        """Every rank, after every step: on a signal, save (unless just saved) and raise Interrupted."""
        from runtime.signals import Interrupted

        signum = self.stop.agreed(self.ctx)
        if not signum or step + 1 >= self.config.train.steps:
            return
        folder = self.save(engine, step + 1) if not saved else None
        folder = folder or self.config.resolved_run_dir / "checkpoints" / f"step_{step + 1:06d}"
        raise Interrupted(signum, step + 1, str(folder))
