"""Calibrated times from public measurements, beside the roofline (off by default).

The roofline prints lower bounds at datasheet peaks; this layer adds "what you will
actually get", fitted to public measurements (XLA's GPU GEMM and collective perf tables,
the Ultra-Scale Playbook's bandwidth sweep) on a fixed calibration split, with every figure
carrying its roofline, its interval and its source. Presets without calibration data (every
TPU) say so and keep the roofline. Pure Python and numpy; no JAX. See docs/calibration.md.

* ``calibrated_matmul`` / ``calibrated_einsum`` / ``achieved_matmul_flops_per_s``: one
  chip's matmul.
* ``calibrated_collective``: one collective over mesh axes (mirrors ``collective_cost``).
* ``calibrate_model_plan``: a model plan's training step, tokens/s, MFU and memory
  (``CalibratedModelTime``), from the GEMM and collective fits and the training-step and
  memory fits of the Playbook runs.
* ``load_calibration``: a preset's fitted parameters (None: roofline only).
* ``model``: the types and the two formulas; ``fit``: the least squares;
  ``data``: the shared CSVs and the fixed split.
"""

from .apply import SHIPPED as SHIPPED
from .apply import CalibratedTime as CalibratedTime
from .apply import achieved_matmul_flops_per_s as achieved_matmul_flops_per_s
from .apply import calibrated_collective as calibrated_collective
from .apply import calibrated_einsum as calibrated_einsum
from .apply import calibrated_matmul as calibrated_matmul
from .apply import gemm_dims as gemm_dims
from .apply import gpus_per_node as gpus_per_node
from .apply import group_tier as group_tier
from .files import list_calibrations as list_calibrations
from .files import load_calibration as load_calibration
from .files import write_calibration as write_calibration
from .model import Calibration as Calibration
from .model import CalibrationSource as CalibrationSource
from .model import CollectiveFit as CollectiveFit
from .model import CollectiveInterval as CollectiveInterval
from .model import MatmulFit as MatmulFit
from .model import MemoryOverheadFit as MemoryOverheadFit
from .model import RatioInterval as RatioInterval
from .model import StallDecision as StallDecision
from .model import StallFit as StallFit
from .model import TrainingStepFit as TrainingStepFit
from .model import collective_time_s as collective_time_s
from .model import matmul_time_s as matmul_time_s
from .step import CalibratedModelTime as CalibratedModelTime
from .step import StepFeatures as StepFeatures
from .step import calibrate_model_plan as calibrate_model_plan
from .step import step_features as step_features

__all__ = [
    "SHIPPED",
    "CalibratedModelTime",
    "CalibratedTime",
    "Calibration",
    "CalibrationSource",
    "CollectiveFit",
    "CollectiveInterval",
    "MatmulFit",
    "MemoryOverheadFit",
    "RatioInterval",
    "StallDecision",
    "StallFit",
    "StepFeatures",
    "TrainingStepFit",
    "achieved_matmul_flops_per_s",
    "calibrate_model_plan",
    "calibrated_collective",
    "calibrated_einsum",
    "calibrated_matmul",
    "collective_time_s",
    "gemm_dims",
    "gpus_per_node",
    "group_tier",
    "list_calibrations",
    "load_calibration",
    "matmul_time_s",
    "step_features",
    "write_calibration",
]
