"""Per-step heterogeneity-adaptive SP planning (FlexSP's problem, planned deterministically).

``plan_step(lengths, num_ranks=..., cost=CostModel.preset(...))`` turns a global batch of
sequence lengths into a :class:`StepPlan`: micro-batches of SP groups of mixed power-of-two
degrees (or of any size, ``group_sizes='any'``). ``planner.baselines`` has static-degree and
batch-adaptive plans, ``planner.megatron_dcp`` Megatron-core's dynamic-CP scheduler, for
comparison; ``planner.async_plan.AsyncPlanner`` plans the next step in the background.
"""

from planner.cost import CostModel
from planner.plan import Group, MicroBatch, StepPlan
from planner.solver import plan_step

__all__ = ["CostModel", "Group", "MicroBatch", "StepPlan", "plan_step"]
