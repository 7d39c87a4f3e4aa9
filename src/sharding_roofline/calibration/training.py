"""The training-step and memory fits on the Playbook's calibration runs.

``benchmarks/calibration.py`` calls ``fit_playbook`` to derive the ``step`` and ``memory``
parts of ``h100.json``; the tests call it too, to check that the shipped numbers are what
this procedure gives. Steps:

1. every Playbook run is mapped onto the planner (``runs.PlaybookRun.layout``) and
   planned; its ``step.StepFeatures`` use the preset's GEMM and collective fits (the XLA
   tables' and the Playbook sweep's, fitted before this);
2. only the calibration split is fitted (1B and 8B on 1-8 nodes, ``data.split_of``);
3. the loss (least squares or Huber on log time) is chosen by 5-fold cross-validation on
   those runs, like the collectives' loss, and the intervals are the 10th-90th percentiles
   of the out-of-fold measured/predicted ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..dtypes import dtype_bytes
from ..errors import ConfigError
from ..plans import Rejected
from ..presets import load_preset
from ..program.model import ModelPlan
from . import data as sd
from .fit import (
    STEP_PARAMETERS,
    FitResult,
    MemoryRows,
    StepRows,
    fit_memory,
    fit_training_step,
    fold_masks,
    memory_predict,
    ratio_quantiles,
    training_step_predict,
)
from .model import Calibration, MemoryOverheadFit, RatioInterval, TrainingStepFit
from .runs import PlaybookRun, RunLayout, RunPlanner, playbook_model_configs
from .step import StepFeatures, step_features

#: What the Playbook's runs are (nanotron's bench defaults, shared/data/README.md).
FRAMEWORK = (
    "nanotron as in the Ultra-Scale Playbook (bf16, AdamW with fp32 master weights, "
    "gradients accumulated and reduced in fp32, 1F1B, sequence-parallel TP, no recompute)"
)
GRADIENT_REDUCE_DTYPE = "float32"
GRAD_ACCUMULATION_BYTES_PER_PARAM = 4.0  # nanotron's fp32 gradient accumulation buffer
#: The Playbook's out-of-memory limit, in its own units ("80 GB", read as 1e9 bytes).
CAPACITY_BYTES = 80e9
NUM_FOLDS = 5
LOSSES: dict[str, float | None] = {"least squares": None, "Huber 0.1": 0.1, "Huber 0.3": 0.3}


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedRun:
    """A Playbook run (measured or failed), its layout, and its plan's features (None with
    the reason when the planner cannot map it)."""

    run: PlaybookRun
    split: sd.Split
    layout: RunLayout
    plan: ModelPlan | None
    features: StepFeatures | None
    rejected: str = ""


@dataclass(slots=True)
class PlaybookData:
    """The Playbook's runs, failed runs and models, planned on the h100 preset."""

    runs: list[PlannedRun] = field(default_factory=list)
    failed: list[PlannedRun] = field(default_factory=list)

    @property
    def calibration_runs(self) -> list[PlannedRun]:
        return [r for r in self.runs if r.split is sd.Split.CALIBRATION and r.features is not None]


def plan_playbook(
    data_dir: Path | str, calibration: Calibration, *, failed: bool = True
) -> PlaybookData:
    """Map and plan every Playbook run (and the failed runs), with features from
    ``calibration``'s GEMM and collective fits."""
    configs = playbook_model_configs(sd.read_rows(data_dir, sd.PLAYBOOK_MODELS_FILE))
    planner = RunPlanner(load_preset("h100"), configs)
    out = PlaybookData()
    files = [(sd.PLAYBOOK_RUNS_FILE, out.runs)]
    if failed:
        files.append((sd.PLAYBOOK_FAILED_FILE, out.failed))
    for name, target in files:
        for row in sd.read_rows(data_dir, name):
            run = PlaybookRun.from_row(row, name)
            target.append(_plan_one(run, sd.split_of(name, row), planner, calibration))
    return out


def plan_calibration_runs(data_dir: Path | str, calibration: Calibration) -> list[PlannedRun]:
    """Only the calibration split's runs, planned (what the fit reads)."""
    configs = playbook_model_configs(sd.read_rows(data_dir, sd.PLAYBOOK_MODELS_FILE))
    planner = RunPlanner(load_preset("h100"), configs)
    out = []
    for row in sd.read_rows(data_dir, sd.PLAYBOOK_RUNS_FILE):
        split = sd.split_of(sd.PLAYBOOK_RUNS_FILE, row)
        if split is sd.Split.CALIBRATION:
            run = PlaybookRun.from_row(row, sd.PLAYBOOK_RUNS_FILE)
            planned = _plan_one(run, split, planner, calibration)
            if planned.features is not None:
                out.append(planned)
    return out


def _plan_one(
    run: PlaybookRun, split: sd.Split, planner: RunPlanner, calibration: Calibration
) -> PlannedRun:
    layout = run.layout()
    plan = planner.plan(layout)
    if isinstance(plan, Rejected):
        return PlannedRun(
            run=run, split=split, layout=layout, plan=None, features=None, rejected=plan.reason
        )
    features = step_features(
        plan,
        calibration,
        gradient_reduce_dtype=GRADIENT_REDUCE_DTYPE,
        microbatches=layout.microbatches,
    )
    return PlannedRun(run=run, split=split, layout=layout, plan=plan, features=features)


def step_rows(runs: list[PlannedRun]) -> StepRows:
    features = [r.features for r in runs if r.features is not None]
    times = [r.run.measured_step_s for r in runs if r.features is not None]
    if len(features) != len(runs) or any(t is None for t in times):
        raise ConfigError("step_rows needs planned runs with a measured step time")
    return StepRows(
        matmul_s=np.array([f.matmul_s for f in features]),
        vector_s=np.array([f.vector_s for f in features]),
        comm_s=np.array([f.comm_s for f in features]),
        layers=np.array([f.layers for f in features], dtype=float),
        tp_ring_steps=np.array([f.tp_ring_steps for f in features], dtype=float),
        gradient_s=np.array([f.gradient_s for f in features]),
        optimizer_s=np.array([f.optimizer_s for f in features]),
        stages=np.array([f.stages for f in features], dtype=float),
        microbatches=np.array([f.microbatches for f in features], dtype=float),
        time_s=np.array(times, dtype=float),
    )


def memory_rows(runs: list[PlannedRun]) -> MemoryRows:
    features = [r.features for r in runs if r.features is not None]
    measured = [r.run.memory_bytes for r in runs if r.features is not None]
    if len(features) != len(runs) or any(m is None for m in measured):
        raise ConfigError("memory_rows needs planned runs with a measured memory")
    return MemoryRows(
        persistent_bytes=np.array(
            [
                f.persistent_bytes + GRAD_ACCUMULATION_BYTES_PER_PARAM * f.local_params
                for f in features
            ]
        ),
        moving_bytes=np.array([f.activation_bytes + f.transient_bytes for f in features]),
        measured_bytes=np.array(measured, dtype=float),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybookFit:
    """The fitted step and memory parts, and how they were chosen."""

    step: TrainingStepFit
    memory: MemoryOverheadFit
    step_fit: FitResult
    memory_fit: FitResult
    report: dict[str, Any]


def _out_of_fold(rows: StepRows, huber: float | None) -> np.ndarray:
    ratios = np.empty(rows.time_s.size)
    for fold in fold_masks(rows.time_s.size, NUM_FOLDS):
        params = fit_training_step(rows.subset(~fold), huber_scale=huber).params
        held = rows.subset(fold)
        ratios[fold] = held.time_s / training_step_predict(params, held)
    return ratios


def _interval(ratios: np.ndarray) -> RatioInterval:
    low, high = ratio_quantiles(ratios)
    return RatioInterval(low_ratio=low, high_ratio=high, num_points=int(ratios.size))


def fit_playbook(runs: list[PlannedRun]) -> PlaybookFit:
    """Fit the training step and memory on ``runs`` (the calibration split; anything else
    is an error)."""
    if any(r.split is not sd.Split.CALIBRATION for r in runs):
        raise ConfigError(
            "fit_playbook fits the calibration split only (1B and 8B on 1-8 nodes); "
            f"got {sum(r.split is not sd.Split.CALIBRATION for r in runs)} held-out runs"
        )
    steps = step_rows(runs)
    cv: dict[str, Any] = {}
    oof: dict[str, np.ndarray] = {}
    for name, huber in LOSSES.items():
        ratios = _out_of_fold(steps, huber)
        oof[name] = ratios
        errors = np.abs(ratios - 1.0)  # tokens/s error: |measured/predicted time - 1|
        cv[name] = {
            "cv_median_error": float(np.median(errors)),
            "cv_mape": float(np.mean(errors)),
        }
    chosen = min(LOSSES, key=lambda name: cv[name]["cv_median_error"])
    step_result = fit_training_step(steps, huber_scale=LOSSES[chosen])
    values = dict(zip(STEP_PARAMETERS, step_result.params, strict=True))
    models = sorted({r.run.model for r in runs})
    nodes = sorted({r.run.nodes for r in runs})
    source = (
        f"{sd.PLAYBOOK_RUNS_FILE} {'/'.join(models)} on {'/'.join(map(str, nodes))} nodes "
        f"({len(runs)} runs, {chosen} on log step time)"
    )
    step = TrainingStepFit(
        framework=FRAMEWORK,
        gradient_reduce_dtype=GRADIENT_REDUCE_DTYPE,
        **values,
        interval=_interval(oof[chosen]),
        num_calibration_rows=len(runs),
        data_source=source,
    )
    memory_table = memory_rows(runs)
    memory_result = fit_memory(memory_table)
    memory_oof = np.empty(memory_table.measured_bytes.size)
    for fold in fold_masks(memory_table.measured_bytes.size, NUM_FOLDS):
        params = fit_memory(memory_table.subset(~fold)).params
        held = memory_table.subset(fold)
        memory_oof[fold] = held.measured_bytes / memory_predict(params, held)
    persistent, activation, workspace = memory_result.params
    memory = MemoryOverheadFit(
        persistent_factor=persistent,
        activation_factor=activation,
        workspace_bytes=workspace,
        grad_accumulation_bytes_per_param=GRAD_ACCUMULATION_BYTES_PER_PARAM,
        capacity_bytes=CAPACITY_BYTES,
        interval=_interval(memory_oof),
        num_calibration_rows=len(runs),
        data_source=(
            f"{sd.PLAYBOOK_RUNS_FILE} gpu_memory_GB of the same {len(runs)} runs (read as "
            f"1e9 bytes; least squares on log memory)"
        ),
    )
    report = {
        "loss_selection": {"chosen": chosen, "cross_validation": cv},
        "step_parameters": values,
        "step_cv_median_error": cv[chosen]["cv_median_error"],
        "memory_parameters": {
            "persistent_factor": persistent,
            "activation_factor": activation,
            "workspace_bytes": workspace,
        },
        "memory_cv_median_error": float(
            np.median(np.abs(1.0 / memory_oof - 1.0))
        ),  # |pred/meas - 1|
        "calibration_runs": len(runs),
        "bytes_per_param_bf16": dtype_bytes("bfloat16"),
    }
    return PlaybookFit(
        step=step, memory=memory, step_fit=step_result, memory_fit=memory_result, report=report
    )
