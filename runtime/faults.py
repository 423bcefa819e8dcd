"""Test-only fault injection, read from the ``SEQMOE_FAULT`` environment variable.

Unset (always, outside tests/test_fault.py and the soak's self-check) nothing here does anything.
The value is one or more faults separated by commas, each ``kind:key=value:...``:

    hang:rank=1:step=3              rank 1 blocks forever when step 3 starts (its peers wait in
                                    the step's first collective until parallel.timeout_s)
    slow:rank=1:step=3:seconds=4    rank 1 sleeps 4 s when step 3 starts, then goes on
    kill_planner:step=3             rank 0 SIGKILLs its planner worker process when step 3 starts
    enospc:step=4                   writing checkpoint 4 fails with ENOSPC (optional rank=R)
    truncate:file=ds/x.pt           a checkpoint file whose path ends with ds/x.pt is cut to half
                                    its size just before it is read

Every fault fires only in the first torchrun attempt (TORCHELASTIC_RESTART_COUNT=0) unless it
says ``attempt=N``, so a restarted job runs clean. The call sites are one line each: the train
loop's step start, the checkpoint writer and runtime/safe_load.py's reader.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import time
from pathlib import Path

__all__ = ["at_step", "checkpoint_write_error", "on_checkpoint_read", "parse", "spawned_children"]

ENV = "SEQMOE_FAULT"
KINDS = {"hang", "slow", "kill_planner", "enospc", "truncate"}


@functools.lru_cache(maxsize=4)
def parse(text: str) -> tuple[tuple[str, dict[str, str]], ...]:
    """``SEQMOE_FAULT``'s value as (kind, {key: value}) pairs."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        kind, *pairs = item.split(":")
        if kind not in KINDS or not all("=" in p for p in pairs):
            raise ValueError(f"{ENV}={text!r}: cannot read {item!r}; want kind:key=value:..., kind in {sorted(KINDS)}")
        faults.append((kind, dict(p.split("=", 1) for p in pairs)))
    return tuple(faults)


def _active(kind: str, **where: object) -> dict[str, str] | None:
    """The first fault of ``kind`` whose keys match ``where`` and this restart attempt."""
    text = os.environ.get(ENV)
    if not text:
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    for k, spec in parse(text):
        if k != kind or spec.get("attempt", "0") != attempt:
            continue
        if all(str(where[key]) == value for key, value in spec.items() if key in where):
            return spec
    return None


def at_step(rank: int, step: int) -> None:
    """Step start: hang, sleep, or kill the planner worker, if asked."""
    if _active("hang", rank=rank, step=step) is not None:
        print(f"[fault] rank {rank} hangs at step {step}", flush=True)
        while True:
            time.sleep(3600)
    spec = _active("slow", rank=rank, step=step)
    if spec is not None:
        time.sleep(float(spec.get("seconds", "1")))
    if rank == 0 and _active("kill_planner", step=step) is not None:
        for pid in spawned_children(os.getpid()):
            print(f"[fault] killing the planner worker (pid {pid}) at step {step}", flush=True)
            os.kill(pid, signal.SIGKILL)


def checkpoint_write_error(rank: int, step: int) -> OSError | None:
    """The OSError that writing checkpoint ``step`` should hit on ``rank`` (a full disk), if any."""
    if _active("enospc", rank=rank, step=step) is None:
        return None
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"checkpoint step {step} (injected by {ENV})")


def on_checkpoint_read(path: Path) -> None:
    """Just before a checkpoint file is read: cut it to half its size, if asked."""
    spec = _active("truncate")
    if spec is not None and str(path).endswith(spec.get("file", "\0")):
        size = Path(path).stat().st_size
        os.truncate(path, size // 2)
        print(f"[fault] truncated {path} from {size} to {size // 2} bytes while it is read", flush=True)


def spawned_children(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (the planner's pool worker; soak samples it)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmd = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(text[text.rindex(")") + 2 :].split()[1]) == pid and b"spawn_main" in cmd:
            found.append(int(stat.parent.name))
    return found
