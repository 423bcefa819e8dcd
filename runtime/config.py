"""Run configuration: nested dataclasses filled from a TOML preset and ``--section.key=value``.

Precedence: command-line overrides > TOML file > dataclass defaults. Every field is checked
against its annotation (int, float, bool, str, Literal choices, tuples) and then by the section's
``validate()``; the first problem raises ``ConfigError`` naming the field (``model.num_heads``),
the bad value and what is allowed. Unknown sections and keys are rejected with the closest
valid name suggested. ``to_toml`` writes the resolved config, which ``load_config`` reads back
to an equal object; every run writes it next to its outputs.

Each component owns its section (``parallel.config``, ``moe.config``, ``planner.config``,
``launchers.config``); the runtime's own sections (model, data, train) live here, and every
section class and ``ConfigError`` are re-exported, so ``from runtime.config import MoEConfig``
works.
"""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import json
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from launchers.config import LaunchConfig
from moe.config import MoEConfig
from parallel.config import ParallelConfig
from parallel.configbase import ConfigError, fail, positive
from planner.config import PlannerConfig

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "LaunchConfig",
    "ModelConfig",
    "MoEConfig",
    "ParallelConfig",
    "PlannerConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "to_toml",
]


@dataclass(kw_only=True)
class ModelConfig:
    layer_pattern: str = "LLLS"
    """Attention type per layer, repeated to num_layers: L = linear attention (LASP-2), S = softmax (LASP-2H)."""
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    """Key/value heads of softmax layers (GQA); must divide num_heads."""
    ffn_hidden: int = 256
    ffn: Literal["dense", "moe"] = "moe"
    linear_decay: Literal["none", "per_head", "per_token"] = "per_head"
    vocab_size: int = 256
    """256 = the byte-level tokenizer."""
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    activation_checkpointing: bool = False
    """Recompute each block in the backward pass (the MoE router state is a checkpoint input)."""

    def validate(self) -> None:
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "S", "G"}:
            fail(
                "model.layer_pattern",
                self.layer_pattern,
                "use a non-empty string of L (linear) and S (softmax) letters, or G (gated DeltaNet)",
            )
        for name in ("num_layers", "d_model", "num_heads", "num_kv_heads", "ffn_hidden", "vocab_size"):
            positive(f"model.{name}", getattr(self, name))
        if self.d_model % self.num_heads:
            fail("model.d_model", self.d_model, f"must be divisible by model.num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            fail("model.num_kv_heads", self.num_kv_heads, f"must divide model.num_heads={self.num_heads}")
        if self.rope_theta <= 0:
            fail("model.rope_theta", self.rope_theta, "must be > 0")


@dataclass(kw_only=True)
class DataConfig:
    source: Literal["embedded", "jsonl", "megatron"] = "embedded"
    path: str = ""
    """Required for jsonl (a .jsonl file) and megatron (the dataset prefix without .bin/.idx)."""
    global_batch_sequences: int = 16
    max_seq_len: int = 2048
    long_sequence_policy: Literal["error", "truncate", "split"] = "split"
    validation_fraction: float = 0.05
    tokenizer: str = "bytes"
    """'bytes' (the 256 byte values) or a local tokenizer.json path; model.vocab_size must equal its vocabulary."""
    text_key: str = "text"
    """data.source = jsonl: the field that holds each record's text."""

    def validate(self) -> None:
        if not self.tokenizer:
            fail("data.tokenizer", self.tokenizer, "use 'bytes' or the path of a tokenizer.json")
        if not self.text_key:
            fail("data.text_key", self.text_key, 'name the JSONL field that holds the text (default "text")')
        if self.source != "embedded" and not self.path:
            fail("data.path", self.path, f"data.source={self.source!r} needs a path")
        positive("data.global_batch_sequences", self.global_batch_sequences)
        positive("data.max_seq_len", self.max_seq_len)
        if not 0.0 <= self.validation_fraction < 1.0:
            fail("data.validation_fraction", self.validation_fraction, "must be in [0, 1)")


@dataclass(kw_only=True)
class TrainConfig:
    steps: int = 50
    seed: int = 0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 5
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    zero_stage: int = 1
    eval_every: int = 25
    eval_batches: int = 2
    log_every: int = 1
    run_dir: str = "runs/{name}"
    """Output folder; {name} is replaced by the config's name."""
    checkpoint_every: int = 25
    """Steps between checkpoints (0 = only at the end); SIGINT/SIGTERM also save one before stopping."""
    keep_checkpoints: int = 2
    resume: str = ""
    """'' = start fresh, 'auto' = the latest valid checkpoint in run_dir, or a checkpoint path."""
    overwrite: bool = False
    """A fresh run into a run_dir that holds another run's history moves that history into
    ``run_dir/overwritten-<time>/`` first; without it such a run refuses to start."""
    max_bad_steps: int = 3
    """Stop after this many consecutive steps with a non-finite loss or gradient."""

    def validate(self) -> None:
        for name in ("steps", "log_every", "keep_checkpoints", "max_bad_steps", "eval_batches"):
            positive(f"train.{name}", getattr(self, name))
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            if getattr(self, name) < 0:
                fail(f"train.{name}", getattr(self, name), "must be >= 0")
        if self.lr <= 0:
            fail("train.lr", self.lr, "must be > 0")
        if not 0 <= self.min_lr <= self.lr:
            fail("train.min_lr", self.min_lr, f"must be in [0, train.lr={self.lr}]")
        if self.zero_stage not in (0, 1, 2):
            fail("train.zero_stage", self.zero_stage, "allowed: 0, 1, 2")
        for name in ("grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                fail(f"train.{name}", getattr(self, name), "must be >= 0 (0 disables)")


@dataclass(kw_only=True)
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def validate(self) -> None:
        if not self.name or any(c in self.name for c in "/\\ "):
            fail("name", self.name, "use a non-empty name without slashes or spaces (it names the run folder)")
        for section in _sections(Config):
            getattr(self, section.name).validate()
        if self.moe.ep_size > self.launch.nproc_per_node * self.launch.nnodes:
            fail(
                "moe.ep_size", self.moe.ep_size, "must not exceed the number of ranks (launch.nnodes × nproc_per_node)"
            )

    @property
    def resolved_run_dir(self) -> Path:
        return Path(self.train.run_dir.replace("{name}", self.name))


def _sections(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if dataclasses.is_dataclass(f.default_factory)]


# --------------------------------------------------------------------------------------------
# Dict <-> dataclass with type checks.
# --------------------------------------------------------------------------------------------


def _suggest(name: str, options: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    if close:
        return f"; did you mean `{prefix}{close[0]}`?"
    return f"; valid names: {', '.join(prefix + o for o in sorted(options))}"


def _coerce(path: str, value: Any, annotation: Any) -> Any:
    """Check ``value`` against ``annotation`` and return it converted (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices or type(value) is bool and bool not in map(type, choices):
            fail(path, value, f"allowed: {', '.join(repr(c) for c in choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(path, value, inner)
    if origin is tuple:
        (item, _) = typing.get_args(annotation)
        if not isinstance(value, list | tuple):
            fail(path, value, "expected a list, e.g. [1, 2]")
        return tuple(_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            fail(path, value, "expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail(path, value, "expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail(path, value, "expected a number")
        if not math.isfinite(value):
            fail(path, value, "expected a finite number (no inf or nan)")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            fail(path, value, "expected a string")
        return value
    raise TypeError(f"config field `{path}` has an unsupported annotation {annotation!r}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if key not in fields:
            where = f"section `{prefix[:-1]}`" if prefix else "the top level"
            raise ConfigError(f"unknown config key `{path}` in {where}{_suggest(key, list(fields), prefix)}")
        annotation = hints[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                fail(path, value, f"`{key}` is a section: write [{key}] in TOML or --{key}.<field>=... overrides")
            kwargs[key] = _build(annotation, value, f"{path}.")
        elif isinstance(value, dict):
            raise ConfigError(f"config field `{path}` is a value, not a section; set it as --{path}=VALUE")
        else:
            kwargs[key] = _coerce(path, value, annotation)
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a Config from a nested dict (as read from TOML)."""
    config = _build(Config, data, "")
    config.validate()
    return config


def _parse_override_value(text: str) -> Any:
    """Read a command-line value as a TOML value (3, 1e-3, true, [1, 2], "x"); bare words are strings.

    TOML dates and times stay strings: no field holds one, and ``--launch.slurm_time=00:30:00``
    means Slurm's time string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text
    return text if isinstance(value, datetime.date | datetime.time) else value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (leading dashes allowed) to a nested dict, in order."""
    data = json.loads(json.dumps(data))  # a deep copy; TOML data is JSON-compatible
    for raw in overrides:
        text = raw.lstrip("-")
        if "=" not in text:
            raise ConfigError(f"override {raw!r} is not of the form --section.key=value (e.g. --train.steps=20)")
        dotted, value = text.split("=", 1)
        *sections, key = dotted.split(".")
        if not key or any(not s for s in sections):
            raise ConfigError(f"override {raw!r} has an empty name; use --section.key=value")
        node = data
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {raw!r}: `{section}` is a value, not a section; use --{dotted.rsplit('.', 1)[0]}=VALUE"
                )
        node[key] = _parse_override_value(value)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the TOML file at ``path`` (if any), then ``overrides``; validated."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} does not exist; presets live in configs/ (e.g. configs/tiny-cpu.toml)"
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            bad = exc.object[exc.start : exc.start + 1]
            raise ConfigError(
                f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} is {bad!r}); TOML files must be "
                "UTF-8: re-save it as UTF-8"
            ) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read ({exc.strerror})") from None
    return config_from_dict(apply_overrides(data, overrides or []))


# --------------------------------------------------------------------------------------------
# Writing the resolved config.
# --------------------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: Config) -> str:
    """The resolved config as TOML; ``load_config`` of it gives back an equal Config."""
    top = [
        f"{f.name} = {_toml_value(getattr(config, f.name))}"
        for f in dataclasses.fields(config)
        if not dataclasses.is_dataclass(f.default_factory)
    ]
    lines = top + [""]
    for section in _sections(Config):
        lines.append(f"[{section.name}]")
        values = getattr(config, section.name)
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if value is not None:  # TOML has no null; None fields fall back to their default
                lines.append(f"{f.name} = {_toml_value(value)}")
        lines.append("")
    return "\n".join(lines)
