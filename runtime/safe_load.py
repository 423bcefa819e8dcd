"""Loading checkpoint files without running code: SHA-256 first, then ``torch.load(weights_only=True)``.

A pickle can name any importable callable, so ``torch.load(weights_only=False)`` on a file from
someone else runs whatever that file says. Every file seqmoe reads back from a checkpoint goes
through :func:`load_verified`:

1. the bytes are read once into memory and their SHA-256 is compared with the manifest's (a
   mismatch raises :class:`ChecksumMismatch` naming the file, before anything is unpickled, and
   nothing can change the bytes between the check and the load);
2. they are unpickled with ``weights_only=True``: tensors, containers, numbers and strings, plus
   the three DeepSpeed types its ZeRO optimizer files hold (:data:`DEEPSPEED_SAFE_GLOBALS`: a
   loss-scaler object, an enum, a dataclass; none of them runs code when rebuilt). Anything else
   raises :class:`UnsafeCheckpoint`.

DeepSpeed's own loader calls ``torch.load(weights_only=False)`` inside its
``TorchCheckpointEngine``; every model, expert and optimizer file it reads goes through
``engine.checkpoint_engine.load``, so :class:`SafeCheckpointEngine` replaces that engine and
DeepSpeed loads weights-only too. Its ``save`` also catches an OSError (a full disk) instead of
raising it in the middle of DeepSpeed's save, so every rank leaves DeepSpeed's collectives in step
and the checkpoint writer can agree on the failure across ranks.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils.tensor_fragment import fragment_address

from runtime import faults

__all__ = [
    "DEEPSPEED_SAFE_GLOBALS",
    "ChecksumMismatch",
    "SafeCheckpointEngine",
    "UnsafeCheckpoint",
    "install_safe_engine",
    "load_verified",
    "save_durable",
    "sha256_file",
]

# The only non-container types in DeepSpeed 0.19's ZeRO-1/2 checkpoints (found with
# torch.serialization.get_unsafe_globals_in_checkpoint on every file of a tiny-cpu run).
DEEPSPEED_SAFE_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]


class ChecksumMismatch(RuntimeError):
    """A file's bytes do not match the manifest (corrupt, truncated, or changed after the save)."""


class UnsafeCheckpoint(RuntimeError):
    """A file holds a pickle that is not plain weights: it is refused, never run."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_verified(path: Path, expected_sha256: str, *, map_location: Any = None, name: str | None = None) -> Any:
    """Read ``path``, check its SHA-256, then unpickle it weights-only (module docstring)."""
    name = name or str(path)
    faults.on_checkpoint_read(path)
    data = Path(path).read_bytes()
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise ChecksumMismatch(
            f"file {name} does not match its manifest checksum ({len(data)} bytes, sha256 {actual[:12]}…, "
            f"manifest {expected_sha256[:12]}…): corrupt, truncated or changed after the save"
        )
    try:
        with torch.serialization.safe_globals(DEEPSPEED_SAFE_GLOBALS):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), str(exc).splitlines()[0])
        raise UnsafeCheckpoint(
            f"file {name} is not a weights-only pickle ({detail[:200]}); refused without loading it: seqmoe never "
            "unpickles code from a checkpoint, take checkpoints only from runs you trust"
        ) from None


def save_durable(obj: Any, path: Path, *, zipfile: bool = True) -> None:
    """``torch.save`` and fsync, so that a later rename publishes bytes that are on the disk."""
    with Path(path).open("wb") as f:
        torch.save(obj, f, _use_new_zipfile_serialization=zipfile)
        f.flush()
        os.fsync(f.fileno())


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, loading weights-only and only files the manifest lists."""

    def __init__(self, config_params=None):
        super().__init__(config_params)
        self.expected: dict[str, str] = {}  # absolute path -> sha256, set before each load
        self.write_error: OSError | None = None  # the first failed write of the current save
        self.inject: OSError | None = None  # test-only: raise this at the next write (runtime/faults.py)

    def load(self, path: str, map_location=None):
        key = os.path.abspath(path)
        if key not in self.expected:
            raise ChecksumMismatch(f"DeepSpeed asked for {path}, which the checkpoint's manifest does not list")
        return load_verified(Path(path), self.expected[key], map_location=map_location, name=path)

    def save(self, state_dict, path: str):
        if self.write_error is not None:
            return  # the save already failed on this rank: write nothing more, keep DeepSpeed's collectives going
        try:
            if self.inject is not None:
                error, self.inject = self.inject, None
                raise error
            save_durable(state_dict, Path(path), zipfile=self.zipfile_serialization)
        except OSError as exc:
            self.write_error = exc
            Path(path).unlink(missing_ok=True)


def install_safe_engine(engine) -> SafeCheckpointEngine:
    """Replace ``engine.checkpoint_engine`` (DeepSpeed's TorchCheckpointEngine) with a SafeCheckpointEngine."""
    current = engine.checkpoint_engine
    if isinstance(current, SafeCheckpointEngine):
        return current
    if type(current) is not TorchCheckpointEngine:
        raise RuntimeError(
            f"DeepSpeed uses a {type(current).__name__}; seqmoe's checkpoints need its TorchCheckpointEngine "
            "(remove the 'checkpoint' writer / datastates settings from the DeepSpeed config)"
        )
    safe = SafeCheckpointEngine.__new__(SafeCheckpointEngine)
    safe.__dict__.update(current.__dict__)
    safe.expected, safe.write_error, safe.inject = {}, None, None
    engine.checkpoint_engine = safe
    return safe
