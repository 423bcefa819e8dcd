"""One error line per job: ranks write their message to a folder the launcher names, and the
launcher prints it once (instead of every rank printing it and torchrun adding its own report).

``seqmoe launch`` creates a temporary folder and names it in ``SEQMOE_ERROR_DIR``; a rank that
fails writes ``rank<k>.json`` there (``write_error``) and prints nothing; after the job the
launcher prints the first message written (``first_error``) and exits with its code. Without
the variable (a single ``seqmoe train``, Slurm) ``write_error`` returns False and the caller
prints the line itself.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

__all__ = ["ERROR_DIR_ENV", "first_error", "write_error"]

ERROR_DIR_ENV = "SEQMOE_ERROR_DIR"


def write_error(message: str, code: int) -> bool:
    """Record this rank's one-line ``message`` and exit ``code``; False when there is no folder to write to."""
    folder = os.environ.get(ERROR_DIR_ENV)
    if not folder:
        return False
    rank = int(os.environ.get("RANK", "0") or 0)
    record = {"rank": rank, "code": code, "message": message, "time": time.time()}
    path = Path(folder) / f"rank{rank}.json"
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def first_error(folder: str | Path) -> dict | None:
    """The earliest record in ``folder`` (ties: the lowest rank), or None."""
    records = []
    for path in Path(folder).glob("rank*.json"):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return None
    # a rank whose peer died first reports a broken connection; the root cause is written earlier
    return min(records, key=lambda r: (round(r.get("time", 0.0), 1), r.get("rank", 0)))
