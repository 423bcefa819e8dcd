"""What every config section shares: ``ConfigError`` and the field checks.

It lives at the lowest layer so each component (parallel/, moe/, planner/, launchers/) can own
its section dataclass without importing runtime/. It imports nothing but the standard library:
importing a launcher's config must not import torch.
"""

from __future__ import annotations

from typing import Any, NoReturn

__all__ = ["ConfigError", "fail", "positive"]


class ConfigError(ValueError):
    """A bad configuration value, key or file; the message names the field and the fix."""


def fail(path: str, value: Any, allowed: str) -> NoReturn:
    """Raise the one-line error for field ``path``: the bad value and what is allowed."""
    raise ConfigError(f"config field `{path}`: got {value!r}; {allowed}")


def positive(path: str, value: int) -> None:
    if value < 1:
        fail(path, value, "must be a positive integer")
