"""One build of DeepSpeed's compiled shm_comm op per venv.

DeepSpeed builds its CPU shared-memory op (``deepspeed_shm_comm``) with torch's JIT extension
loader the first time a DeepSpeed process group comes up, and torch runs whichever ``ninja`` is
first on PATH in the folder TORCH_EXTENSIONS_DIR names (default ~/.cache/torch_extensions, shared
by every venv). Two things made it rebuild from scratch again and again (~33 s idle, ~80 s
loaded, each time): processes that disagreed on the folder, and processes that disagreed on the
ninja. Ninja 1.11 (/usr/bin) and 1.13 (pip's, beside the venv's python) hash a command line
differently and write different log versions, so each reads the other's build as stale; a
process gets the venv's ninja only where someone put the venv's bin/ on PATH (an activated venv,
a launcher test), the system's otherwise. ``one_op_build`` pins both for the op build: the
venv's folder and the venv's ninja, whoever the caller is (CLI, test, spawned rank, benchmark).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["one_op_build", "use_venv_extensions_dir"]


def use_venv_extensions_dir() -> None:
    """Inside a writable venv and unless the user set it, TORCH_EXTENSIONS_DIR is <venv>/torch_extensions
    (kept for the process: child ranks inherit it)."""
    folder = Path(sys.prefix) / "torch_extensions"
    if "TORCH_EXTENSIONS_DIR" not in os.environ and sys.prefix != sys.base_prefix and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(folder)


def _venv_ninja_dir() -> str | None:
    """The folder of the ninja pip installed with DeepSpeed (a dependency of it), or None."""
    try:
        import ninja
    except ImportError:
        return None
    folder = getattr(ninja, "BIN_DIR", None)
    return folder if folder and os.path.isfile(os.path.join(folder, "ninja")) else None


@contextmanager
def one_op_build() -> Iterator[None]:
    """Around whatever may build DeepSpeed's op (``deepspeed.init_distributed``/``initialize``): the
    venv's extensions folder, and pip's ninja first on PATH, so every process builds with the same
    ninja into the same folder and finds the op already built. PATH is restored afterwards: only the
    op build sees the change, not the launchers or subprocesses this process starts later."""
    use_venv_extensions_dir()
    folder = _venv_ninja_dir()
    old_path = os.environ.get("PATH")
    if folder:
        os.environ["PATH"] = os.pathsep.join([folder, old_path or os.defpath])
    try:
        yield
    finally:
        if folder:
            if old_path is None:
                os.environ.pop("PATH", None)
            else:
                os.environ["PATH"] = old_path
