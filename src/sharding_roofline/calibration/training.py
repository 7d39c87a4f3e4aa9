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

import dataclasses
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
from .model import (
    Calibration,
    MemoryOverheadFit,
    RatioInterval,
    StallDecision,
    StallFit,
    TrainingStepFit,
    stall_share,
)
from .runs import PlaybookRun, RunLayout, RunPlanner, playbook_model_configs, spearman
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
#: A calibration run counts as stalled above this measured/predicted step (assumed: the
#: calibration runs' ratios have a gap between about 1.4 and 2, see the docs' "Stalls").
STALL_RATIO = 1.8
#: Candidate memory-pressure thresholds (share of the capacity), chosen by cross-validation.
MEMORY_PRESSURE_GRID = (0.70, 0.75, 0.80, 0.85, 0.90, 0.95)
#: How the calibrated step summarises a stall's two outcomes: by definition, not fitted,
#: their expectation (docs/calibration.md, "Stalls": continuous in the probability, the
#: figure a wall-clock budget needs, and what ranks configurations by expected cost).
SHIPPED_DECISION = StallDecision.MEAN
_HAZARD_GRID = np.linspace(0.0, 0.3, 601)
_PROBABILITY_GRID = np.linspace(0.0, 1.0, 201)


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
class StallRows:
    """What the stall fit reads per calibration run."""

    stalled: np.ndarray  # bool: measured/predicted base step > STALL_RATIO
    excess_per_exchange_s: np.ndarray  # (measured - predicted)/(slots·exchanges)
    nodes: np.ndarray
    pipelined: np.ndarray  # bool
    zero0_data_parallel: np.ndarray  # bool: dp > 1 with ZeRO-0
    memory_share: np.ndarray  # predicted memory / capacity
    stall_exchanges: np.ndarray  # slots·exchanges (a count): a stall costs this x its size
    base_step_s: np.ndarray  # the out-of-fold predicted base step (for the decision)
    measured_step_s: np.ndarray
    group: np.ndarray  # "model/nodes": the Spearman's groups

    def subset(self, keep: np.ndarray) -> StallRows:
        return StallRows(**{f.name: getattr(self, f.name)[keep] for f in dataclasses.fields(self)})


@dataclass(frozen=True, slots=True)
class StallForm:
    """A candidate form of the stall probability: a per-node hazard (or one probability
    per run), a separate class for pipelined ZeRO-0 data-parallel runs or not, and a
    memory-pressure threshold (None: no such term)."""

    per_node: bool
    zero0_class: bool
    threshold: float | None

    @property
    def name(self) -> str:
        text = "per-node hazard" if self.per_node else "one probability"
        if self.zero0_class:
            text += " + ZeRO-0 pipelined class"
        if self.threshold is not None:
            text += f" + memory > {self.threshold:.2f}"
        return text


def _log_loss(probability: np.ndarray, stalled: np.ndarray) -> Any:
    """The log loss of the stalled labels, summed over the last axis (a float for one row
    of probabilities, an array for a grid of them)."""
    q = np.clip(probability, 1e-6, 1.0 - 1e-6)
    return -np.sum(np.where(stalled, np.log(q), np.log(1.0 - q)), axis=-1)


#: hazards: (unpipelined, pipelined, pipelined ZeRO-0 data-parallel), then q (numbers, or
#: arrays that broadcast against the rows: a grid of candidates)
StallParams = tuple[Any, Any, Any, Any]


def stall_probabilities(params: StallParams, rows: StallRows, form: StallForm) -> np.ndarray:
    """``StallFit``'s probability under ``form`` (``per_node=False``: one probability per
    run, whatever its node count, the alternative the cross-validation compares)."""
    h_flat, h_pipe, h_zero0, q = params
    hazard: Any = np.where(rows.pipelined, h_pipe, h_flat)
    if form.zero0_class:
        hazard = np.where(rows.pipelined & rows.zero0_data_parallel, h_zero0, hazard)
    exponent = rows.nodes if form.per_node else np.ones_like(rows.nodes)
    calm = (1.0 - hazard) ** exponent
    if form.threshold is not None:
        calm = calm * np.where(rows.memory_share > form.threshold, 1.0 - q, 1.0)
    result: np.ndarray = 1.0 - calm
    return result


def fit_stall_probability(rows: StallRows, form: StallForm) -> StallParams:
    """Maximum likelihood of the stalled labels: (unpipelined hazard, pipelined hazard,
    ZeRO-0 pipelined hazard, memory-pressure probability), by coordinate search on grids
    (the parameters ``form`` does not use stay 0; a grid is scored at once, broadcast)."""
    params = [0.01, 0.01, 0.01 if form.zero0_class else 0.0, 0.0]
    grids = [
        _HAZARD_GRID,
        _HAZARD_GRID,
        _HAZARD_GRID if form.zero0_class else np.zeros(1),
        _PROBABILITY_GRID if form.threshold is not None else np.zeros(1),
    ]
    for _ in range(8):
        before = list(params)
        for i, grid in enumerate(grids):
            trial = [np.full((grid.size, 1), value) for value in params]
            trial[i] = grid[:, None]
            probability = stall_probabilities((trial[0], trial[1], trial[2], trial[3]), rows, form)
            params[i] = float(grid[int(np.argmin(_log_loss(probability, rows.stalled)))])
        if params == before:  # a fixed point of the search
            break
    return params[0], params[1], params[2], params[3]


def stall_rows(
    runs: list[PlannedRun],
    step: FitResult,
    steps: StepRows,
    memory: np.ndarray,
    out_of_fold: np.ndarray,
) -> StallRows:
    """The stall fit's rows: stalled labels and sizes from the base step fitted on every run
    (``step``); for the decision, the base step predicted out of fold (``out_of_fold``:
    measured over predicted)."""
    features = [r.features for r in runs if r.features is not None]
    ratios = np.array(step.ratios)
    predicted = steps.time_s / ratios
    exchanges = np.array([2.0 if f.stages >= 3 else 1.0 for f in features])
    slots = np.array([float(f.slots) for f in features])
    return StallRows(
        stalled=ratios > STALL_RATIO,
        excess_per_exchange_s=(steps.time_s - predicted) / (slots * exchanges),
        nodes=np.array([float(f.nodes) for f in features]),
        pipelined=np.array([f.stages > 1 for f in features]),
        zero0_data_parallel=np.array([f.zero0_data_parallel for f in features]),
        memory_share=memory / CAPACITY_BYTES,
        stall_exchanges=slots * exchanges,
        base_step_s=steps.time_s / np.asarray(out_of_fold, dtype=float),
        measured_step_s=steps.time_s,
        group=np.array([f"{r.run.model}/{r.run.nodes}" for r in runs if r.features is not None]),
    )


def decision_steps(
    rows: StallRows, probability: np.ndarray, size_s: float, decision: StallDecision
) -> np.ndarray:
    """The steps of ``rows`` with the stall summarised as ``decision`` says (base steps out
    of fold)."""
    stall_s = rows.stall_exchanges * size_s
    ratio = (rows.base_step_s + stall_s) / rows.base_step_s
    steps: np.ndarray = rows.base_step_s + stall_share(decision, probability, ratio) * stall_s
    return steps


def decision_scores(rows: StallRows, steps: np.ndarray) -> tuple[float, float]:
    """(tokens/s MAPE, median Spearman within the (model, nodes) groups of at least 3 runs)
    of predicted ``steps``: the issue's two time goals."""
    mape = float(np.mean(np.abs(rows.measured_step_s / steps - 1.0)))
    rhos = []
    for group in sorted(set(rows.group.tolist())):
        members = rows.group == group
        if members.sum() >= 3:
            # tokens/s per GPU ranks as 1/step within a group of one batch and GPU count
            rho = spearman(
                (1.0 / steps[members]).tolist(), (1.0 / rows.measured_step_s[members]).tolist()
            )
            if not np.isnan(rho):
                rhos.append(rho)
    return mape, float(np.median(rhos)) if rhos else float("nan")


#: The candidate forms of the stall probability, compared by cross-validated log loss.
STALL_FORMS = tuple(
    StallForm(per_node=per_node, zero0_class=zero0, threshold=threshold)
    for per_node in (False, True)
    for zero0 in (False, True)
    for threshold in (None, *MEMORY_PRESSURE_GRID)
)


def fit_stall(rows: StallRows, num_runs: int) -> tuple[StallFit, dict[str, Any]]:
    """The stall part: its size from the stalled calibration runs; its probability's form
    (per-node hazard or one probability; a ZeRO-0 pipelined class or not; with or without
    a memory-pressure term, and its threshold) by 5-fold cross-validated log loss of the
    stalled labels. The step carries the stall's expectation (``SHIPPED_DECISION``); every
    decision's cross-validated tokens/s MAPE and within-group Spearman on the same folds
    go in the report, for comparison."""
    if not rows.stalled.any():
        raise ConfigError("fit_stall: no stalled calibration run")
    size = float(np.median(rows.excess_per_exchange_s[rows.stalled]))
    folds = fold_masks(rows.stalled.size, NUM_FOLDS)
    cv: dict[str, float] = {}
    out_of_fold: dict[str, np.ndarray] = {}
    for form in STALL_FORMS:
        loss = 0.0
        probability = np.empty(rows.stalled.size)
        for fold in folds:
            params = fit_stall_probability(rows.subset(~fold), form)
            held = rows.subset(fold)
            probability[fold] = stall_probabilities(params, held, form)
            loss += float(_log_loss(probability[fold], held.stalled))
        cv[form.name] = loss / rows.stalled.size
        out_of_fold[form.name] = probability
    chosen = min(STALL_FORMS, key=lambda f: cv[f.name])
    if not chosen.per_node:
        raise ConfigError(
            "fit_stall: cross-validation prefers one stall probability for every node count; "
            "StallFit describes a per-node hazard"
        )
    scores = {
        d: decision_scores(rows, decision_steps(rows, out_of_fold[chosen.name], size, d))
        for d in StallDecision
    }
    decision = SHIPPED_DECISION
    h_flat, h_pipe, h_zero0, q = fit_stall_probability(rows, chosen)
    stall = StallFit(
        stall_per_exchange_s=size,
        hazard_per_node_pipelined=h_pipe,
        hazard_per_node_unpipelined=h_flat,
        hazard_per_node_pipelined_zero0=h_zero0 if chosen.zero0_class else None,
        memory_pressure_fraction=1.0 if chosen.threshold is None else chosen.threshold,
        memory_pressure_probability=q,
        decision=decision,
        stall_ratio=STALL_RATIO,
        num_calibration_rows=num_runs,
        num_stalled_rows=int(rows.stalled.sum()),
        data_source=(
            f"{sd.PLAYBOOK_RUNS_FILE}: {int(rows.stalled.sum())} of the {num_runs} calibration "
            f"runs measured over {STALL_RATIO:g}x the base step ({chosen.name}, by "
            f"cross-validated log loss; the step is the {decision.value} of the two outcomes)"
        ),
    )
    report = {
        "stall_ratio": STALL_RATIO,
        "stalled_runs": int(rows.stalled.sum()),
        "stall_per_exchange_s": size,
        "stall_per_exchange_quartiles_s": [
            float(x) for x in np.percentile(rows.excess_per_exchange_s[rows.stalled], [25, 75])
        ],
        "probability_selection": {"chosen": chosen.name, "cv_log_loss_per_run": cv},
        "decision_selection": {
            "chosen": decision.value,
            "cross_validation": {
                d.value: {"cv_mape": mape, "cv_spearman_median": rho}
                for d, (mape, rho) in scores.items()
            },
        },
        "hazard_per_node_pipelined": h_pipe,
        "hazard_per_node_unpipelined": h_flat,
        "hazard_per_node_pipelined_zero0": h_zero0 if chosen.zero0_class else None,
        "memory_pressure_fraction": stall.memory_pressure_fraction,
        "memory_pressure_probability": q,
    }
    return stall, report


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybookFit:
    """The fitted step, memory and stall parts, and how they were chosen."""

    step: TrainingStepFit
    memory: MemoryOverheadFit
    stall: StallFit
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
    stall, stall_report = fit_stall(
        stall_rows(
            runs,
            step_result,
            steps,
            memory_predict(memory_result.params, memory_table),
            oof[chosen],
        ),
        len(runs),
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
        "stall": stall_report,
    }
    return PlaybookFit(
        step=step,
        memory=memory,
        stall=stall,
        step_fit=step_result,
        memory_fit=memory_result,
        report=report,
    )
