"""sharding_roofline: plan and cost sharded einsums and whole transformer layers across TPU
and GPU meshes, after "How to Scale Your Model" (the scaling book), and check the plan
against XLA.

The analytical core never imports JAX; ``sharding_roofline.xla`` (the validator) and
``sharding_roofline.plot`` (matplotlib) are imported on demand. The program API (layers,
strategies, the layout search) loads when first used (PEP 562), so the command line starts
fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .collectives import Bound as Bound
from .collectives import Collective as Collective
from .collectives import CollectiveCost as CollectiveCost
from .collectives import Combine as Combine
from .collectives import collective_cost as collective_cost
from .crossover import Crossover as Crossover
from .crossover import crossover as crossover
from .einsum import Einsum as Einsum
from .einsum import EinsumSpec as EinsumSpec
from .errors import ConfigError as ConfigError
from .errors import PlanError as PlanError
from .errors import ShardingRooflineError as ShardingRooflineError
from .errors import SpecError as SpecError
from .errors import TopologyError as TopologyError
from .errors import UnknownNameError as UnknownNameError
from .errors import ValidationError as ValidationError
from .estimate import Bottleneck as Bottleneck
from .estimate import Cost as Cost
from .estimate import Overlap as Overlap
from .hardware import ChipSpec as ChipSpec
from .hardware import HardwareSpec as HardwareSpec
from .mesh import DeviceMesh as DeviceMesh
from .planner import Planner as Planner
from .planner import estimate as estimate
from .planner import plan as plan
from .plans import Plan as Plan
from .plans import Ranking as Ranking
from .plans import Rejected as Rejected
from .plans import Step as Step
from .presets import list_presets as list_presets
from .presets import load_preset as load_preset
from .sharding import ShardedOperation as ShardedOperation
from .sharding import ShardingSpec as ShardingSpec
from .topology import Topology as Topology

if TYPE_CHECKING:
    from .program.analysis import CriticalBatch as CriticalBatch
    from .program.analysis import critical_batch as critical_batch
    from .program.analysis import max_model_parallel as max_model_parallel
    from .program.autodiff import OptimizerSpec as OptimizerSpec
    from .program.autodiff import Remat as Remat
    from .program.autodiff import training as training
    from .program.config import ModelConfig as ModelConfig
    from .program.config import load_model_config as load_model_config
    from .program.evaluate import MemoryBreakdown as MemoryBreakdown
    from .program.evaluate import OpPlan as OpPlan
    from .program.evaluate import Placement as Placement
    from .program.evaluate import ProgramPlan as ProgramPlan
    from .program.evaluate import evaluate as evaluate
    from .program.graph import Op as Op
    from .program.graph import Program as Program
    from .program.graph import Tensor as Tensor
    from .program.layers import LayerKind as LayerKind
    from .program.layers import LayerSpec as LayerSpec
    from .program.layers import build_layer as build_layer
    from .program.layers import einsum_program as einsum_program
    from .program.model import ModelPlan as ModelPlan
    from .program.model import Schedule as Schedule
    from .program.model import Training as Training
    from .program.model import plan_model as plan_model
    from .program.model_search import SearchResult as SearchResult
    from .program.model_search import search_model as search_model
    from .program.search import ProgramRanking as ProgramRanking
    from .program.search import compare as compare
    from .program.search import search as search
    from .program.strategies import Strategy as Strategy
    from .program.strategies import named_strategies as named_strategies
    from .program.strategies import place as place

#: public name -> the module that defines it
_WHERE: dict[str, str] = {
    "CriticalBatch": ".program.analysis",
    "critical_batch": ".program.analysis",
    "max_model_parallel": ".program.analysis",
    "OptimizerSpec": ".program.autodiff",
    "Remat": ".program.autodiff",
    "training": ".program.autodiff",
    "MemoryBreakdown": ".program.evaluate",
    "OpPlan": ".program.evaluate",
    "Placement": ".program.evaluate",
    "ProgramPlan": ".program.evaluate",
    "evaluate": ".program.evaluate",
    "Op": ".program.graph",
    "Program": ".program.graph",
    "Tensor": ".program.graph",
    "LayerKind": ".program.layers",
    "LayerSpec": ".program.layers",
    "build_layer": ".program.layers",
    "einsum_program": ".program.layers",
    "ProgramRanking": ".program.search",
    "compare": ".program.search",
    "search": ".program.search",
    "Strategy": ".program.strategies",
    "named_strategies": ".program.strategies",
    "place": ".program.strategies",
    "ModelConfig": ".program.config",
    "load_model_config": ".program.config",
    "ModelPlan": ".program.model",
    "Schedule": ".program.model",
    "Training": ".program.model",
    "plan_model": ".program.model",
    "SearchResult": ".program.model_search",
    "search_model": ".program.model_search",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'sharding_roofline' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


__version__ = "0.1.0"

__all__ = [
    "Bottleneck",
    "Bound",
    "ChipSpec",
    "Collective",
    "CollectiveCost",
    "Combine",
    "ConfigError",
    "Cost",
    "CriticalBatch",
    "Crossover",
    "DeviceMesh",
    "Einsum",
    "EinsumSpec",
    "HardwareSpec",
    "LayerKind",
    "LayerSpec",
    "MemoryBreakdown",
    "ModelConfig",
    "ModelPlan",
    "Op",
    "OpPlan",
    "OptimizerSpec",
    "Overlap",
    "Placement",
    "Plan",
    "PlanError",
    "Planner",
    "Program",
    "ProgramPlan",
    "ProgramRanking",
    "Ranking",
    "Rejected",
    "Remat",
    "Schedule",
    "SearchResult",
    "ShardedOperation",
    "ShardingRooflineError",
    "ShardingSpec",
    "SpecError",
    "Step",
    "Strategy",
    "Tensor",
    "Topology",
    "TopologyError",
    "Training",
    "UnknownNameError",
    "ValidationError",
    "build_layer",
    "collective_cost",
    "compare",
    "critical_batch",
    "crossover",
    "einsum_program",
    "estimate",
    "evaluate",
    "list_presets",
    "load_model_config",
    "load_preset",
    "max_model_parallel",
    "named_strategies",
    "place",
    "plan",
    "plan_model",
    "search",
    "search_model",
    "training",
]
