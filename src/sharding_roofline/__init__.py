"""sharding_roofline: plan and cost sharded einsums across TPU and GPU meshes, after
"How to Scale Your Model" (the scaling book), and check the plan against XLA.

The analytical core imported here never imports JAX; ``sharding_roofline.xla`` (the
validator) and ``sharding_roofline.plot`` (matplotlib) are imported on demand.
"""

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
    "Crossover",
    "DeviceMesh",
    "Einsum",
    "EinsumSpec",
    "HardwareSpec",
    "Overlap",
    "Plan",
    "PlanError",
    "Planner",
    "Ranking",
    "Rejected",
    "ShardedOperation",
    "ShardingRooflineError",
    "ShardingSpec",
    "SpecError",
    "Step",
    "Topology",
    "TopologyError",
    "UnknownNameError",
    "ValidationError",
    "collective_cost",
    "crossover",
    "estimate",
    "list_presets",
    "load_preset",
    "plan",
]
