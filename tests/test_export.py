"""Model out: a 2-rank run (ep_size 2 or 1, ZeRO stage 0/1/2) exported to one safetensors file
gives, in a fresh single-process ep_size-1 model, the logits of the training model restored by
DeepSpeed's own loader on the training ranks; generation from the checkpoint runs; bad paths
and damaged checkpoints are one-line errors.

Tolerance: 1e-6 absolute on fp32 logits of magnitude ~1 (measured: 1.8e-7 at ZeRO 1 / EP 2,
1.2e-7 at ZeRO 0 / EP 2, 0 at ZeRO 2 / EP 1): the parameters are the same; the training ranks run
each expert on the rows the all-to-all brings, in another order and batch shape, so a matmul may
round differently."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import run_on_ranks
from tests.test_launchers import TRAIN_ARGS

LOGIT_TOL = 1e-6
FIXED_TEXT = "def train(config):\n    return run(config)  # fixed input ✓\n"


def _overrides(run_dir: Path, zero_stage: int, ep_size: int) -> list[str]:
    return [
        *TRAIN_ARGS[1:],
        "--moe.num_experts=4",
        f"--moe.ep_size={ep_size}",
        f"--train.zero_stage={zero_stage}",
        "--train.steps=3",
        f"--train.run_dir={run_dir}",
    ]


def _train_then_reference_logits(ctx, run_dir: str, zero_stage: int, ep_size: int):
    """Train 3 steps; then a fresh engine (other initial weights) restores the final checkpoint
    through DeepSpeed and computes the logits of FIXED_TEXT on every rank (experts split by EP)."""
    from runtime.checkpoint import load_checkpoint
    from runtime.config import load_config
    from runtime.data import encode
    from runtime.model import SPContext, build_model
    from runtime.train import _train, build_engine

    config = load_config(TRAIN_ARGS[0], _overrides(Path(run_dir), zero_stage, ep_size))
    row = _train(ctx, config, lambda *_: None)
    torch.manual_seed(1234)
    model = build_model(config.model, config.parallel, config.moe, balance_group=ctx.world, seed=99)
    engine = build_engine(model, config)
    step = load_checkpoint(engine, ctx, "auto", config.resolved_run_dir / "checkpoints", lambda *_: None)
    model.eval()
    with torch.no_grad():
        tokens = encode(FIXED_TEXT)
        logits = model(tokens[None], SPContext.single(tokens.numel())).logits[0]
    return {"step": step, "loss": row["loss"], "logits": logits}


_RUNS: dict[tuple[int, int], tuple[Path, list[dict]]] = {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(zero_stage, ep_size) -> (run folder, per-rank results); each run trained once per module."""

    def get(zero_stage: int, ep_size: int):
        key = (zero_stage, ep_size)
        if key not in _RUNS:
            run_dir = tmp_path_factory.mktemp(f"run_z{zero_stage}_ep{ep_size}")
            results = run_on_ranks(2, _train_then_reference_logits, str(run_dir), zero_stage, ep_size, timeout_s=600)
            _RUNS[key] = (run_dir, results)
        return _RUNS[key]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage,ep_size", [(1, 2), (0, 2), (2, 1)])
def test_export_gives_the_training_models_logits(trained, tmp_path, zero_stage, ep_size):
    from safetensors.torch import load_file

    from runtime.data import encode
    from runtime.export import export_checkpoint, load_checkpoint_model, load_exported
    from runtime.generate import next_token_logits

    run_dir, results = trained(zero_stage, ep_size)
    assert [r["step"] for r in results] == [3, 3]
    reference = results[0]["logits"]
    assert torch.allclose(results[1]["logits"], reference, atol=LOGIT_TOL, rtol=0)
    result = export_checkpoint(run_dir, tmp_path / "export")
    assert result.step == 3 and result.checkpoint.name == "step_000003"
    meta = json.loads((tmp_path / "export" / "config.json").read_text())
    assert meta["moe"]["ep_size"] == 1 and meta["source"]["ep_size"] == ep_size
    assert meta["source"]["zero_stage"] == zero_stage and meta["tokenizer"] == "bytes"
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    experts = {k for k in tensors if ".deepspeed_experts." in k}
    assert {k.split(".deepspeed_experts.")[1].split(".")[0] for k in experts} == {"0", "1", "2", "3"}
    model, tokenizer, _ = load_exported(tmp_path / "export")
    logits = next_token_logits(model, encode(FIXED_TEXT))
    err = (logits - reference).abs().max().item()
    assert err <= LOGIT_TOL, err
    assert logits.abs().max().item() > 0.1  # not trivially zero
    # the in-memory consolidation that `generate --checkpoint` uses gives the same model
    from_checkpoint, _, _ = load_checkpoint_model(run_dir / "checkpoints" / "step_000003")
    assert torch.equal(next_token_logits(from_checkpoint, encode(FIXED_TEXT)), logits)


@pytest.mark.slow
def test_generate_from_a_checkpoint_and_an_export(trained, tmp_path):
    from runtime.export import export_checkpoint, load_exported
    from runtime.generate import GenerateError, sample

    run_dir, _ = trained(1, 2)
    exe = Path(sys.executable).parent / "seqmoe"
    args = ["generate", "--checkpoint", str(run_dir), "--prompt", "def main(", "--max-new-tokens", "12"]
    out = subprocess.run([str(exe), *args, "--seed", "3"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("def main(") and len(out.stdout) > len("def main(\n")
    export_checkpoint(run_dir, tmp_path / "export")
    model, tokenizer, _ = load_exported(tmp_path / "export")
    prompt = tokenizer.encode("def main(")
    first = sample(model, prompt, max_new_tokens=12, seed=3, top_k=20)
    assert len(first) == 12 and all(0 <= t < 256 for t in first)
    assert sample(model, prompt, max_new_tokens=12, seed=3, top_k=20) == first  # seeded
    greedy = sample(model, prompt, max_new_tokens=5, temperature=0)
    assert greedy == sample(model, prompt, max_new_tokens=5, temperature=0, seed=7)
    assert sample(model, prompt, max_new_tokens=0) == []
    for bad in ({"temperature": -1.0}, {"top_k": -2}, {"max_new_tokens": -1}):
        with pytest.raises(GenerateError):
            sample(model, prompt, **{"max_new_tokens": 2, **bad})
    with pytest.raises(GenerateError, match="at least one character"):
        sample(model, [], max_new_tokens=2)
    empty = subprocess.run([str(exe), *args[:3], "--prompt", ""], capture_output=True, text=True, timeout=300)
    assert empty.returncode == 2 and "at least one character" in empty.stderr and "Traceback" not in empty.stderr


@pytest.mark.slow
def test_export_errors_are_one_line(trained, tmp_path):
    from runtime.cli import main

    run_dir, _ = trained(1, 2)
    checkpoint = run_dir / "checkpoints" / "step_000003"

    def fails(path: Path, *phrases: str) -> None:
        code = subprocess.run(
            [str(Path(sys.executable).parent / "seqmoe"), "export", str(path), "--out", str(tmp_path / "never")],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert code.returncode == 1 and "Traceback" not in code.stderr, code.stderr[-2000:]
        lines = [x for x in code.stderr.splitlines() if x.startswith("seqmoe export:")]
        assert len(lines) == 1, code.stderr
        for phrase in phrases:
            assert phrase in lines[0], (phrase, lines[0])
        assert not (tmp_path / "never" / "model.safetensors").exists()

    fails(tmp_path / "nowhere", "no such folder")
    (tmp_path / "empty_run").mkdir()
    fails(tmp_path / "empty_run", "no finished checkpoint")
    # an expert file lost: the consolidated state misses that expert's parameters
    lost = tmp_path / "lost" / "checkpoints" / "step_000003"
    shutil.copytree(checkpoint, lost)
    shutil.copy(run_dir / "config.toml", tmp_path / "lost" / "config.toml")
    (lost / "ds" / "layer_2_expert_3_mp_rank_00_model_states.pt").unlink()
    fails(tmp_path / "lost", "missing", "deepspeed_experts.3")
    # a truncated model-states file
    torn = tmp_path / "torn" / "checkpoints" / "step_000003"
    shutil.copytree(checkpoint, torn)
    shutil.copy(run_dir / "config.toml", tmp_path / "torn" / "config.toml")
    states = torn / "ds" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:100])
    fails(tmp_path / "torn", "cannot read", "mp_rank_00_model_states.pt")
    # a checkpoint moved away from its run's config.toml
    alone = tmp_path / "alone" / "step_000003"
    shutil.copytree(checkpoint, alone)
    fails(alone, "no config.toml")
    # a config that does not describe the checkpoint's model
    other = tmp_path / "other"
    shutil.copytree(run_dir / "checkpoints", other / "checkpoints")
    text = (run_dir / "config.toml").read_text().replace("d_model = 32", "d_model = 64")
    (other / "config.toml").write_text(text)
    fails(other, "shape")
    assert main(["generate", "--export", str(tmp_path / "nowhere"), "--prompt", "x"]) == 1
