"""``python -m launchers.quiet torch.distributed.run ARGS``: torchrun without its own noise.

``seqmoe launch`` runs torchrun through this unless ``--verbose``: torchrun's log lines are
turned down to critical ones, and a failed job ends with the exit code and no
``ChildFailedError`` traceback. The failing ranks' own one-line messages reach the user through
launchers/errors.py; when no rank left one (a rank killed by a signal), one line here says
which rank ended how.
"""

from __future__ import annotations

import os
import signal
import sys

from launchers.errors import ERROR_DIR_ENV, first_error


def _describe(failures: dict) -> str:
    rank, failure = min(failures.items())
    code = failure.exitcode
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    more = f" ({len(failures)} ranks failed)" if len(failures) > 1 else ""
    return f"rank {rank} {how}{more}; rerun with --verbose for the full torchrun and rank output"


def main() -> int:
    module, sys.argv = sys.argv[1], sys.argv[1:]
    os.environ.setdefault("LOGLEVEL", "CRITICAL")  # read by torch.distributed.elastic's loggers
    import logging

    import torch.distributed.run as torchrun  # creates torchrun's loggers, turned down next
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)

    if module != "torch.distributed.run":
        raise SystemExit(f"launchers.quiet runs torch.distributed.run, got {module!r}")
    try:
        torchrun.run(torchrun.parse_args(sys.argv[1:]))  # main() without @record's error report
    except ChildFailedError as exc:
        folder = os.environ.get(ERROR_DIR_ENV)
        if not (folder and first_error(folder)):
            print(f"seqmoe launch: {_describe(exc.failures)}", file=sys.stderr)
        codes = [f.exitcode for f in exc.failures.values() if f.exitcode > 0]
        return codes[0] if codes else 1
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main())
