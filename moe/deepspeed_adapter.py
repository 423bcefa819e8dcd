"""Everything seqmoe relies on inside DeepSpeed's MoE, in one place.

DeepSpeed's engine recognises an MoE layer by type (``deepspeed.moe.layer.MoE``) and reads a few
attributes from it: ``num_experts``, ``ep_size``, ``num_local_experts``, ``expert_group_name``,
``enable_expert_tensor_parallelism``, the experts under ``deepspeed_moe.experts`` (reduced over
the expert-data-parallel group, saved per expert in checkpoints, split into MoE optimizer groups)
and ``set_deepspeed_parallelism``. Routing, balance and dispatch are seqmoe's own (DeepSpeed's
``TopKGate`` has a rank-local capacity, a local-only l_aux and no recurrent router), so
DeepSpeed's ``MoE.__init__``, which would build that gate, is not run.

The expert-parallel groups are made by DeepSpeed's private ``groups._create_expert_and_data_parallel``
so that the engine finds them under its names. Pinned to deepspeed==0.19.8 (pyproject.toml);
a DeepSpeed upgrade is checked here and nowhere else.
"""

from __future__ import annotations

import torch.distributed as dist
from deepspeed.moe.experts import Experts
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from torch import nn

from moe.experts import expert_group_name
from parallel.comm import SOLO, Group
from parallel.context import primary_backend
from parallel.op_build import one_op_build

__all__ = ["DeepSpeedMoEModule", "expert_parallel_group"]


def expert_parallel_group(ep_size: int) -> Group:
    """This rank's expert-parallel group of ``ep_size`` consecutive ranks (SOLO for 1), created through
    DeepSpeed (``ep_size_<n>``, with its expert-data-parallel partner groups). Creating the groups
    is collective: every rank must call this with the same ``ep_size`` in the same order."""
    if not dist.is_initialized():
        if ep_size == 1:
            return SOLO
        raise ValueError(f"ep_size={ep_size} needs torch.distributed initialised (ParallelContext.initialize) first")
    world = dist.get_world_size()
    if world % ep_size:
        raise ValueError(f"ep_size={ep_size} must divide the number of ranks ({world})")
    import deepspeed
    from deepspeed import comm as ds_comm
    from deepspeed.utils import groups

    if not ds_comm.is_initialized():
        with one_op_build():  # builds DeepSpeed's shm op: once per venv (parallel/op_build.py)
            deepspeed.init_distributed(dist_backend=primary_backend(dist.get_backend()), auto_mpi_discovery=False)
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        # ep_size 1 too: DeepSpeed's engine looks up the expert-data-parallel group of every expert
        groups._create_expert_and_data_parallel(ep_size)
    return SOLO if ep_size == 1 else groups._get_expert_parallel_group(name)


class DeepSpeedMoEModule(DeepSpeedMoE):
    """A ``deepspeed.moe.layer.MoE`` as the engine sees it, holding ``num_experts // ep_size``
    local copies of ``expert``, without DeepSpeed's gate. Subclasses add routing and forward."""

    def __init__(self, *, expert: nn.Module, num_experts: int, ep_size: int):
        nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: it would build its own gate (module docstring)
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.enable_expert_tensor_parallelism = False
        self.deepspeed_moe = nn.Module()
        self.deepspeed_moe.experts = Experts(expert, self.num_local_experts, self.expert_group_name)

    @property
    def local_experts(self) -> nn.ModuleList:
        return self.deepspeed_moe.experts.deepspeed_experts

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False, *args, **kwargs) -> None:
        """Called by DeepSpeed's engine; our groups already exist (made before the layer)."""
        if use_data_before_expert_parallel_:
            raise ValueError("use_data_before_expert_parallel_ is not supported: EP groups are consecutive ranks")
