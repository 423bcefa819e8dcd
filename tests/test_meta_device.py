"""The dense model runs forward and backward on the ``meta`` device (DESIGN invariant 7).

A meta tensor has a shape and a dtype but no data, so any op that mixes a CPU tensor into a
device computation, and any read of a value back to the host (``.tolist()``, ``.item()``,
``bool``/``int``/``float`` of a tensor), raises. Running a whole step there shows that the model
at SP=1 creates its tensors on the device it is given and, with the SP context built from host
ints, reads nothing back. Covers both mixers (L = LASP-2 linear attention, S = softmax with
RoPE), per-head and per-token decay, packed documents, padding, and activation recompute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from parallel.sp_context import SPContext
from runtime.config import ModelConfig, ParallelConfig
from runtime.model import build_model

META = torch.device("meta")
T = 24
BOUNDS = [0, 5, 13, 20, 24]  # four documents, the last one padding


def _config(decay: str, checkpointing: bool = False) -> ModelConfig:
    return ModelConfig(
        layer_pattern="LLS",
        num_layers=3,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_hidden=48,
        ffn="dense",
        linear_decay=decay,
        activation_checkpointing=checkpointing,
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "recompute"])
@pytest.mark.parametrize("linear_sp", ["lasp2", "lasp1", "ulysses"])
@pytest.mark.parametrize("decay", ["per_head", "per_token"])
def test_dense_model_forward_backward_on_meta(decay, linear_sp, checkpointing):
    with torch.device(META):
        model = build_model(_config(decay, checkpointing), ParallelConfig(linear_sp=linear_sp))
    assert all(p.device == META for p in model.parameters())
    tokens = torch.zeros(1, T, dtype=torch.long, device=META)
    targets = torch.zeros(T, dtype=torch.long, device=META)
    valid_T = torch.arange(T) < BOUNDS[-2]  # host data, as the runtime knows it
    sp = SPContext.single(T, BOUNDS, device=META, valid_T=valid_T)
    assert sp.positions_T.device == META and sp.cu_seqlens.device == META and sp.valid_T.device == META
    logits, _ = model(tokens, sp)
    assert logits.shape == (1, T, model.config.vocab_size) and logits.device == META
    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets, ignore_index=-100, reduction="sum")
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.device == META, name


def test_a_host_read_on_meta_raises():
    """What makes the test above catch host reads: meta tensors have no values to read."""
    x = torch.zeros(3, device=META)
    with pytest.raises((RuntimeError, NotImplementedError)):
        x.tolist()
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(x.sum() > 0)
