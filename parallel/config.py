"""The ``[parallel]`` config section: backend, device and the sequence-parallel method per kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from parallel.configbase import fail

__all__ = ["ParallelConfig"]


@dataclass(kw_only=True)
class ParallelConfig:
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """auto = NCCL when CUDA is available, else gloo."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    linear_sp: Literal["lasp2", "lasp1", "ulysses", "scan"] = "lasp2"
    """scan = pipelined state passing (parallel/scan.py)."""
    softmax_sp: Literal["allgather", "ulysses"] = "allgather"
    """allgather = LASP-2H."""
    timeout_s: float = 600.0

    def validate(self) -> None:
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda"):
            fail("parallel.device", self.device, "allowed: 'auto', 'cpu', 'cuda', 'cuda:N'")
        if self.timeout_s <= 0:
            fail("parallel.timeout_s", self.timeout_s, "must be > 0 seconds")
