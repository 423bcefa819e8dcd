"""The scaling sweep config: which model, world sizes, scaling modes and plan policies to run.

A sweep is a TOML file (configs/scaling-sweep.toml for GPU clusters, configs/scaling-tiny-cpu.toml
for CPU tests)::

    [sweep]
    name = "scaling"                 # stem of the outputs: <name>.json, <name>.png, <name>_w<W>.json
    config = "hybrid-1b-moe-8gpu.toml"   # the run preset, relative to this file
    overrides = ["data.max_seq_len=32768"]   # --section.key=value on the preset (without the --)
    world_sizes = [8, 16, 32]        # powers of two; each is its own launch (benchmarks/scaling.py)
    modes = ["weak", "strong"]
    policies = ["flexsp", "static", "batch_adaptive", "megatron_dcp"]   # "static": every degree
    steps = 4                        # measured steps per mode and policy
    warmup = 1                       # unmeasured first steps
    time_limit_s = 2.0               # planner time limit per step
    cost_model = ""                  # "": the preset's planner.cost_model; a preset; a JSON (relative path)
    interleave = true                # policies take turns step by step (each keeps its own model copy)

    [sweep.weak]
    tokens_per_rank = 32768          # the global batch grows with W
    [sweep.strong]
    global_tokens = 262144           # the same global batches at every W

    [launch]                         # how the driver starts each world size (launchers.config)
    launcher = "torchrun"
    nproc_per_node = 8               # ranks per node: a world size above it spans W / nproc_per_node nodes

Every problem is a ``SweepError`` with one line naming the file, the field and the fix.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launchers.config import LaunchConfig
from parallel.configbase import ConfigError

__all__ = ["MODES", "POLICY_KINDS", "Sweep", "SweepError", "load_sweep", "policies_at"]

MODES = ("weak", "strong")
POLICY_KINDS = ("flexsp", "static", "batch_adaptive", "megatron_dcp")
SWEEP_KEYS = {
    "name",
    "config",
    "overrides",
    "world_sizes",
    "modes",
    "policies",
    "steps",
    "warmup",
    "time_limit_s",
    "cost_model",
    "interleave",
    "weak",
    "strong",
}


class SweepError(ValueError):
    """A sweep config that cannot run; the message names the field and the fix."""


@dataclass(kw_only=True)
class Sweep:
    path: Path
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    world_sizes: list[int]
    modes: list[str]
    policies: list[str]
    steps: int = 4
    warmup: int = 1
    time_limit_s: float = 1.0
    cost_model: str = ""
    interleave: bool = True
    tokens_per_rank: int = 0
    global_tokens: int = 0
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def config_overrides(self, world_size: int) -> list[str]:
        """The preset overrides for one world size (the config validates ep_size etc. against it)."""
        extra = [f"--planner.cost_model={self.cost_model}"] if self.cost_model else []
        return [
            *(f"--{o}" for o in self.overrides),
            *extra,
            "--planner.async_plan=false",  # plans are made up front, before any step is timed
            "--train.eval_every=0",
            f"--train.steps={self.warmup + self.steps}",
            "--launch.nnodes=1",
            f"--launch.nproc_per_node={world_size}",
        ]

    def target_tokens(self, mode: str, world_size: int) -> int:
        """Tokens of each global batch: fixed per rank (weak) or fixed in all (strong)."""
        return self.tokens_per_rank * world_size if mode == "weak" else self.global_tokens

    def fingerprint(self) -> str:
        """Everything but the world sizes and the launch: per-size results with the same
        fingerprint belong to one sweep and are merged into one report."""
        data = dataclasses.asdict(self)
        for key in ("path", "world_sizes", "launch"):
            data.pop(key)
        data["config"] = self.config.name
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def as_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["path"], data["config"] = str(self.path), str(self.config)
        return data


def policies_at(sweep: Sweep, world_size: int, degrees: list[int]) -> list[str]:
    """The policy names that run at ``world_size``: "static" expands to static-d for every
    degree d the cost model allows (``degrees``)."""
    names: list[str] = []
    for policy in sweep.policies:
        if policy == "static":
            names += [f"static-{d}" for d in degrees if d <= world_size]
        elif policy.startswith("static-"):
            if int(policy.split("-")[1]) <= world_size:
                names.append(policy)
        else:
            names.append(policy)
    return list(dict.fromkeys(names))


def load_sweep(path: str | Path, *, launch_overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; ``launch_overrides`` are ``--launch.key=value`` arguments."""
    path = Path(path).resolve()
    where = str(path)
    if not path.is_file():
        raise SweepError(f"sweep file {where!r} does not exist; see configs/scaling-sweep.toml for one")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SweepError(f"sweep file {where!r} is not valid UTF-8 TOML: {exc}") from None
    unknown = sorted(set(data) - {"sweep", "launch"})
    if unknown:
        raise SweepError(f"{where}: unknown section(s) {unknown}; a sweep has [sweep] and [launch]")
    table = data.get("sweep")
    if not isinstance(table, dict):
        raise SweepError(f"{where}: no [sweep] section; see configs/scaling-sweep.toml")
    unknown = sorted(set(table) - SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{where}: unknown key(s) sweep.{unknown[0]}; known: {', '.join(sorted(SWEEP_KEYS))}")

    def get(key: str, kind: type | tuple[type, ...], default: Any = None) -> Any:
        if key not in table:
            if default is None:
                raise SweepError(f"{where}: sweep.{key} is missing; see configs/scaling-sweep.toml")
            return default
        value = table[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise SweepError(f"{where}: sweep.{key} = {value!r} must be a {names}")
        return value

    config = path.parent / get("config", str)
    if not config.is_file():
        raise SweepError(f"{where}: sweep.config = {str(config)!r} does not exist; name a preset relative to the sweep")
    sweep = Sweep(
        path=path,
        name=get("name", str, path.stem),
        config=config,
        overrides=_strings(where, "overrides", get("overrides", list, [])),
        world_sizes=_world_sizes(where, get("world_sizes", list)),
        modes=_choices(where, "modes", get("modes", list, list(MODES)), MODES),
        policies=_policies(where, get("policies", list, list(POLICY_KINDS))),
        steps=_at_least(where, "steps", get("steps", int, 4), 1),
        warmup=_at_least(where, "warmup", get("warmup", int, 1), 0),
        time_limit_s=float(get("time_limit_s", (int, float), 1.0)),
        cost_model=get("cost_model", str, ""),
        interleave=get("interleave", bool, True),
    )
    if sweep.cost_model.endswith(".json"):  # a `seqmoe profile` file, relative to the sweep like the preset
        sweep.cost_model = str((path.parent / sweep.cost_model).resolve())
    if not sweep.time_limit_s > 0:
        raise SweepError(f"{where}: sweep.time_limit_s = {sweep.time_limit_s} must be > 0 seconds")
    for mode, key in (("weak", "tokens_per_rank"), ("strong", "global_tokens")):
        sub = table.get(mode, {})
        if not isinstance(sub, dict) or set(sub) - {key}:
            raise SweepError(f"{where}: [sweep.{mode}] takes exactly one key, {key}")
        if mode in sweep.modes:
            value = sub.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SweepError(f"{where}: sweep.{mode}.{key} = {value!r} must be a positive integer (tokens)")
            setattr(sweep, key, value)
    sweep.launch = _launch(where, data.get("launch", {}), launch_overrides or [])
    return sweep


def _strings(where: str, key: str, values: list) -> list[str]:
    for value in values:
        if not isinstance(value, str) or "=" not in value or value.startswith("-"):
            raise SweepError(f"{where}: sweep.{key} entry {value!r} must look like 'section.key=value' (no --)")
    return list(values)


def _world_sizes(where: str, values: list) -> list[int]:
    if not values:
        raise SweepError(f"{where}: sweep.world_sizes is empty; list powers of two, e.g. [8, 16, 32]")
    for w in values:
        if not isinstance(w, int) or isinstance(w, bool) or w < 1 or w & (w - 1):
            raise SweepError(f"{where}: sweep.world_sizes entry {w!r} must be a power of two >= 1 (planner groups)")
    if len(set(values)) != len(values):
        raise SweepError(f"{where}: sweep.world_sizes = {values} lists a size twice")
    return sorted(values)


def _choices(where: str, key: str, values: list, allowed: tuple[str, ...]) -> list[str]:
    if not values or any(v not in allowed for v in values):
        raise SweepError(f"{where}: sweep.{key} = {values!r}; choose from {list(allowed)}")
    return list(dict.fromkeys(values))


def _policies(where: str, values: list) -> list[str]:
    if not values:
        raise SweepError(f"{where}: sweep.policies is empty; choose from {list(POLICY_KINDS)} or static-<degree>")
    for v in values:
        ok = v in POLICY_KINDS or (
            isinstance(v, str)
            and v.startswith("static-")
            and v[7:].isdigit()
            and int(v[7:]) >= 1
            and not int(v[7:]) & (int(v[7:]) - 1)
        )
        if not ok:
            raise SweepError(
                f"{where}: sweep.policies entry {v!r}; choose from {list(POLICY_KINDS)} or static-<power of two>"
            )
    return list(dict.fromkeys(values))


def _at_least(where: str, key: str, value: int, low: int) -> int:
    if value < low:
        raise SweepError(f"{where}: sweep.{key} = {value} must be >= {low}")
    return value


def _launch(where: str, table: dict, overrides: list[str]) -> LaunchConfig:
    """The [launch] section (launchers.config.LaunchConfig) with ``--launch.key=value`` on top."""
    from runtime.config import apply_overrides, config_from_dict

    bad = [o for o in overrides if not o.startswith("--launch.")]
    if bad:
        raise SweepError(f"the scaling driver takes only --launch.key=value overrides, got {bad[0]}")
    try:
        config = config_from_dict(apply_overrides({"launch": dict(table)}, overrides))
    except ConfigError as exc:
        raise SweepError(f"{where}: {exc}") from None
    if config.launch.nnodes != 1:
        raise SweepError(
            f"{where}: launch.nnodes = {config.launch.nnodes}; leave it at 1: the driver derives the nodes of each "
            "world size from launch.nproc_per_node (ranks per node)"
        )
    return config.launch
