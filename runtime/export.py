"""Model out: a training checkpoint as one ``model.safetensors`` plus ``config.json``.

    seqmoe export runs/tiny-cpu --out exported/       # newest finished checkpoint of a run
    seqmoe export runs/tiny-cpu/checkpoints/step_000050 --out exported/

A checkpoint (runtime/checkpoint.py) holds DeepSpeed's files under ``ds/``:
``mp_rank_00_model_states.pt`` with every non-expert parameter under ``module``, and one
``layer_<l>_expert_<e>_mp_rank_00_model_states.pt`` per MoE layer and *global* expert ``e``
(DeepSpeed names and keys them by global expert id whatever ``ep_size`` was). ZeRO stages 0-2
partition only optimizer state and gradients, never parameters, so rank 0's module state is the
whole dense part at any stage; the experts are gathered from their files. DeepSpeed's
``zero_to_fp32.py`` cannot do this: it fails on the per-expert files. Every file is read with
``torch.load(weights_only=True)``: DeepSpeed 0.19.8 writes only tensors, containers and plain
values there, so no unpickling of arbitrary objects is needed.

The consolidated state is the state of the same model at ``moe.ep_size = 1``, which
``load_exported`` rebuilds in one process (the checkpoint's config.toml gives the model and MoE
sections); loading is strict, so a file that does not match the config is an error, not a
silently half-loaded model. A run trained with a ``tokenizer.json`` gets a copy of it next to
the weights, so an export folder is all ``seqmoe generate --export`` needs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from runtime.config import Config, ConfigError, config_from_dict, load_config
from runtime.model import HybridLM, build_model
from runtime.tokenizer import BYTES, Tokenizer, load_tokenizer

__all__ = [
    "ExportError",
    "ExportResult",
    "consolidated_state_dict",
    "export_checkpoint",
    "load_checkpoint_model",
    "load_exported",
    "resolve_checkpoint",
]

FORMAT = "seqmoe-export"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
_DS_MODEL = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt")


class ExportError(ValueError):
    """A path that is not a finished checkpoint or export, or files that do not match the config."""


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder (``step_NNNNNN``) that ``path`` names: a run folder (its newest
    finished checkpoint), a checkpoint folder, or the checkpoint's ``ds/`` folder."""
    path = Path(path)
    if not path.exists():
        raise ExportError(f"{path}: no such folder; give a run folder (runs/NAME) or one of its checkpoints")
    if path.name == "ds" and (path / _DS_MODEL).is_file():
        path = path.parent
    if (path / "ds" / _DS_MODEL).is_file():
        if not (path / "manifest.json").is_file():
            raise ExportError(f"checkpoint {path} has no manifest.json: its save did not finish; use an earlier one")
        return path
    root = path / "checkpoints"
    finished = sorted(p for p in root.glob("step_*") if (p / "manifest.json").is_file() and (p / "ds").is_dir())
    if not finished:
        raise ExportError(
            f"{path} holds no finished checkpoint (looked for {root}/step_*/manifest.json); train with "
            "train.checkpoint_every > 0 or to the end of train.steps first"
        )
    return finished[-1]


def run_config(checkpoint: Path) -> Config:
    """The config a checkpoint was trained with: ``config.toml`` of its run folder."""
    for candidate in (checkpoint / "config.toml", checkpoint.parent.parent / "config.toml"):
        if candidate.is_file():
            return load_config(candidate)
    raise ExportError(
        f"no config.toml for checkpoint {checkpoint} (looked in it and in its run folder "
        f"{checkpoint.parent.parent}); a checkpoint moved out of its run folder needs the run's config.toml beside it"
    )


def _load(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file, or one with objects weights_only refuses to unpickle
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ExportError(f"cannot read {path} as tensors (weights_only): {first}") from None


def consolidated_state_dict(checkpoint: Path) -> dict[str, Tensor]:
    """Every parameter of the model at ``moe.ep_size = 1``: the dense part from rank 0's module
    state, each expert from its own file (keys already carry the global expert id)."""
    ds = checkpoint / "ds"
    if any(ds.glob("mp_rank_0[1-9]*_model_states.pt")) or any(ds.glob("mp_rank_[1-9]*_model_states.pt")):
        raise ExportError(f"{ds} has tensor-parallel shards (mp_rank_01+); this exporter reads mp_rank_00 only")
    main = _load(ds / _DS_MODEL)
    if not isinstance(main, dict) or not isinstance(main.get("module"), dict):
        raise ExportError(f"{ds / _DS_MODEL} has no 'module' state (not a DeepSpeed model-states file)")
    state = dict(main["module"])
    for path in sorted(ds.iterdir()):
        if _EXPERT_FILE.fullmatch(path.name):
            experts = _load(path)
            overlap = set(experts) & set(state)
            if overlap:
                raise ExportError(f"{path} repeats parameter {sorted(overlap)[0]} already read from another file")
            state.update(experts)
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def _single_process_config(config: Config) -> Config:
    """The same model at ep_size 1 on one process (SP = 1 needs nothing else)."""
    return dataclasses.replace(
        config,
        moe=dataclasses.replace(config.moe, ep_size=1),
        model=dataclasses.replace(config.model, activation_checkpointing=False),
    )


def build_single_process_model(config: Config, state: dict[str, Tensor], *, where: str) -> HybridLM:
    """A fresh ep_size-1 model of ``config`` with ``state`` loaded strictly, in eval mode."""
    config = _single_process_config(config)
    model = build_model(config.model, config.parallel, config.moe, seed=config.train.seed)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        raise ExportError(f"{where} does not match its config's model: parameters {', '.join(parts)}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise ExportError(
                f"{where}: parameter {name} has shape {tuple(tensor.shape)}, the config's model "
                f"{tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=True)
    return model.eval()


def _tokenizer_file(config: Config, checkpoint: Path) -> Path | None:
    if config.data.tokenizer == BYTES:
        return None
    path = Path(config.data.tokenizer)
    for candidate in (path, checkpoint.parent.parent / path.name):
        if candidate.is_file():
            return candidate
    raise ExportError(
        f"the run used data.tokenizer={config.data.tokenizer!r}, which is not found from here (nor in the run "
        f"folder); run the command from the folder training ran in"
    )


@dataclass(frozen=True)
class ExportResult:
    checkpoint: Path
    out_dir: Path
    step: int
    num_tensors: int
    num_parameters: int


def export_checkpoint(path: str | Path, out_dir: str | Path) -> ExportResult:
    """Write ``model.safetensors`` + ``config.json`` (+ ``tokenizer.json``) for the checkpoint ``path``."""
    from safetensors.torch import save_file

    checkpoint = resolve_checkpoint(path)
    config = run_config(checkpoint)
    state = consolidated_state_dict(checkpoint)
    build_single_process_model(config, state, where=f"checkpoint {checkpoint}")  # fails before writing anything
    tokenizer = _tokenizer_file(config, checkpoint)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    single = _single_process_config(config)
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": dataclasses.asdict(single.model),
        "moe": dataclasses.asdict(single.moe),
        "tokenizer": BYTES if tokenizer is None else TOKENIZER,
        "source": {
            "checkpoint": str(checkpoint),
            "step": int(manifest.get("step", -1)),
            "name": config.name,
            "ep_size": config.moe.ep_size,
            "zero_stage": config.train.zero_stage,
            "world_size": manifest.get("world_size"),
        },
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # each file lands whole (write, then rename): an interrupted export never leaves a torn file
    _atomic(out / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))
    (out / WEIGHTS).chmod(0o644)  # safetensors writes owner-only; an export is meant to be shared
    _atomic(out / CONFIG, lambda tmp: tmp.write_text(json.dumps(meta, indent=1) + "\n"))
    if tokenizer is not None:
        _atomic(out / TOKENIZER, lambda tmp: shutil.copyfile(tokenizer, tmp))
    return ExportResult(checkpoint, out, meta["source"]["step"], len(state), sum(t.numel() for t in state.values()))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


def load_exported(folder: str | Path) -> tuple[HybridLM, Tokenizer, dict]:
    """The model (eval mode, CPU), tokenizer and config.json of an export folder."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta_path, weights = folder / CONFIG, folder / WEIGHTS
    if not meta_path.is_file() or not weights.is_file():
        raise ExportError(
            f"{folder} is not an export folder (it needs {CONFIG} and {WEIGHTS}; write one with seqmoe export)"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except ValueError as exc:
        raise ExportError(f"{meta_path} is not valid JSON ({exc})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ExportError(f"{meta_path} is not a version-{VERSION} {FORMAT} config.json")
    try:
        config = config_from_dict({"model": meta["model"], "moe": meta["moe"]})
    except (ConfigError, KeyError) as exc:
        raise ExportError(f"{meta_path}: {exc}") from None
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors reports a bad header as a plain error
        raise ExportError(f"cannot read {weights}: {exc}") from None
    model = build_single_process_model(config, state, where=str(weights))
    spec = meta.get("tokenizer", BYTES)
    tokenizer = load_tokenizer(spec if spec == BYTES else str(folder / spec))
    return model, tokenizer, meta


def load_checkpoint_model(path: str | Path) -> tuple[HybridLM, Tokenizer, dict]:
    """The model (eval mode, CPU) and tokenizer of a training checkpoint, consolidated in memory."""
    checkpoint = resolve_checkpoint(path)
    config = run_config(checkpoint)
    model = build_single_process_model(config, consolidated_state_dict(checkpoint), where=f"checkpoint {checkpoint}")
    tokenizer_path = _tokenizer_file(config, checkpoint)
    tokenizer = load_tokenizer(BYTES if tokenizer_path is None else str(tokenizer_path))
    return model, tokenizer, {"source": {"checkpoint": str(checkpoint)}}
