"""The calibrated training step: the formulas by hand, the fits on synthetic data, the
split of the Playbook runs, the shipped parameters against the benchmark's fit, the
Playbook and torchtitan mappings, and ``model --calibrated``."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from sharding_roofline import DeviceMesh, load_preset
from sharding_roofline.calibration import (
    CalibratedModelTime,
    Calibration,
    MatmulFit,
    MemoryOverheadFit,
    RatioInterval,
    StallDecision,
    StallFit,
    StepFeatures,
    TrainingStepFit,
    calibrate_model_plan,
    load_calibration,
    step_features,
    training,
)
from sharding_roofline.calibration import data as sd
from sharding_roofline.calibration.fit import (
    STEP_PARAMETERS,
    MemoryRows,
    StepRows,
    fit_memory,
    fit_training_step,
    memory_predict,
    training_step_predict,
)
from sharding_roofline.calibration.runs import PlaybookRun, TorchtitanRun, spearman
from sharding_roofline.calibration.step import (
    memory_bytes,
    stall_probability,
    stall_time_s,
    step_time_s,
)
from sharding_roofline.cli import main
from sharding_roofline.errors import ConfigError, SpecError
from sharding_roofline.program.config import ModelConfig
from sharding_roofline.program.graph import OpKind, Phase
from sharding_roofline.program.model import ModelPlan, Schedule, Training, plan_model

REPO = Path(__file__).resolve().parents[1]
DATA = sd.find_data_dir(REPO)
needs_data = pytest.mark.skipif(DATA is None, reason="the shared data folder is absent")

INTERVAL = RatioInterval(low_ratio=0.8, high_ratio=1.5, num_points=10)


def _step_fit(**changes: object) -> TrainingStepFit:
    base = TrainingStepFit(
        framework="test",
        gradient_reduce_dtype="float32",
        hidden_fraction=0.5,
        gradient_hidden_fraction=0.25,
        host_floor_per_layer_s=0.01,
        pipeline_tp_floor_per_layer_step_s=0.005,
        pipeline_send_s=0.002,
        fixed_step_s=0.03,
        vector_time_factor=1.5,
        interval=INTERVAL,
        num_calibration_rows=10,
        data_source="test",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _memory_fit(**changes: object) -> MemoryOverheadFit:
    base = MemoryOverheadFit(
        persistent_factor=1.2,
        activation_factor=0.7,
        workspace_bytes=1e9,
        grad_accumulation_bytes_per_param=4.0,
        capacity_bytes=80e9,
        interval=INTERVAL,
        num_calibration_rows=10,
        data_source="test",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _stall_fit(**changes: object) -> StallFit:
    """A stall fit with round numbers; ``changes`` go to the constructor (so that
    ``__post_init__`` sees them)."""
    fields: dict[str, object] = {
        "stall_per_exchange_s": 0.5,
        "hazard_per_node_pipelined": 0.02,
        "hazard_per_node_unpipelined": 0.0,
        "memory_pressure_fraction": 0.8,
        "memory_pressure_probability": 0.5,
        "stall_ratio": 1.8,
        "num_calibration_rows": 10,
        "num_stalled_rows": 2,
        "data_source": "test",
    }
    return StallFit(**{**fields, **changes})  # type: ignore[arg-type]


def _features(**changes: object) -> StepFeatures:
    base = StepFeatures(
        matmul_s=0.1,
        vector_s=0.02,
        comm_s=0.05,
        layers=4,
        tp_ring_steps=3,
        gradient_s=0.2,
        optimizer_s=0.01,
        stages=2,
        microbatches=3,
        persistent_bytes=10e9,
        local_params=1e9,
        activation_bytes=20e9,
        transient_bytes=2e9,
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# The formulas, by hand


def test_step_time_by_hand() -> None:
    fit = _step_fit()
    # device 0.1 + 1.5·0.02 = 0.13; exposed 0.13 + 0.05 - 0.5·min(0.13, 0.05) = 0.155;
    # floor 4·(0.01 + 0.005·3) = 0.1 < 0.155; slot 0.155 + send 0.002 = 0.157;
    # step (3 + 2 - 1)·0.157 + 0.75·0.2 + 0.01 + 0.03 = 0.818
    assert step_time_s(fit, _features()) == pytest.approx(0.818)
    # 20 layers: the floor 20·0.025 = 0.5 binds; step 4·0.502 + 0.19 = 2.198
    assert step_time_s(fit, _features(layers=20)) == pytest.approx(2.198)
    # no pipeline: no per-step TP floor, no send, m slots: 3·max(0.155, 0.04) + 0.19
    assert step_time_s(fit, _features(stages=1)) == pytest.approx(3 * 0.155 + 0.19)


def test_fewer_microbatches_than_stages_pay_the_whole_bubble() -> None:
    fit = _step_fit()
    one = step_time_s(fit, _features(microbatches=1, stages=4))
    # m + P - 1 = 4 slots of 0.157 s
    assert one == pytest.approx(4 * 0.157 + 0.19)


def test_memory_by_hand() -> None:
    # 1.2·(10 GB + 4 B·1e9 params) + 0.7·(20 GB + 2 GB) + 1 GB
    assert memory_bytes(_memory_fit(), _features()) == pytest.approx(33.2e9)


def _rows(features: list[StepFeatures], times: np.ndarray) -> StepRows:
    def col(name: str) -> np.ndarray:
        return np.array([getattr(f, name) for f in features], dtype=float)

    return StepRows(
        matmul_s=col("matmul_s"),
        vector_s=col("vector_s"),
        comm_s=col("comm_s"),
        layers=col("layers"),
        tp_ring_steps=col("tp_ring_steps"),
        gradient_s=col("gradient_s"),
        optimizer_s=col("optimizer_s"),
        stages=col("stages"),
        microbatches=col("microbatches"),
        time_s=times,
    )


def _synthetic(seed: int = 0, count: int = 400) -> list[StepFeatures]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        stages = int(rng.choice([1, 1, 2, 4, 8]))
        out.append(
            _features(
                matmul_s=float(rng.uniform(0.002, 0.4)),
                vector_s=float(rng.uniform(0.0005, 0.05)),
                comm_s=float(rng.uniform(0.0, 0.3)),
                layers=int(rng.choice([2, 4, 8, 16, 32])),
                tp_ring_steps=int(rng.choice([0, 1, 3, 7, 15])),
                gradient_s=float(rng.uniform(0.0, 0.5)),
                optimizer_s=float(rng.uniform(0.001, 0.05)),
                stages=stages,
                microbatches=int(rng.choice([1, 2, 4, 8, 16, 32])),
            )
        )
    return out


def test_vectorised_step_time_is_the_formula() -> None:
    fit = _step_fit()
    features = _synthetic(1, 50)
    params = [getattr(fit, name) for name in STEP_PARAMETERS]
    vector = training_step_predict(params, _rows(features, np.ones(len(features))))
    assert vector == pytest.approx([step_time_s(fit, f) for f in features])


def test_step_fit_recovers_known_parameters() -> None:
    truth = _step_fit(
        hidden_fraction=0.4,
        gradient_hidden_fraction=0.3,
        host_floor_per_layer_s=0.004,
        pipeline_tp_floor_per_layer_step_s=0.002,
        pipeline_send_s=0.003,
        fixed_step_s=0.05,
        vector_time_factor=1.3,
    )
    features = _synthetic()
    times = np.array([step_time_s(truth, f) for f in features])
    result = fit_training_step(_rows(features, times))
    for name, value in zip(STEP_PARAMETERS, result.params, strict=True):
        assert value == pytest.approx(getattr(truth, name), rel=1e-3), name
    assert result.rms_log_error < 1e-6


def test_step_fit_reports_a_parameter_at_zero_as_zero() -> None:
    truth = _step_fit(hidden_fraction=0.0, fixed_step_s=0.0)
    features = _synthetic(2)
    times = np.array([step_time_s(truth, f) for f in features])
    fitted = dict(
        zip(STEP_PARAMETERS, fit_training_step(_rows(features, times)).params, strict=True)
    )
    assert fitted["hidden_fraction"] == 0.0
    assert fitted["fixed_step_s"] == 0.0


def test_memory_fit_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    persistent = rng.uniform(1e9, 40e9, 200)
    moving = rng.uniform(0.5e9, 60e9, 200)
    measured = 1.15 * persistent + 0.75 * moving + 2e9
    rows = MemoryRows(persistent_bytes=persistent, moving_bytes=moving, measured_bytes=measured)
    result = fit_memory(rows)
    assert result.params == pytest.approx((1.15, 0.75, 2e9), rel=1e-4)
    assert memory_predict(result.params, rows) == pytest.approx(measured, rel=1e-6)


def test_spearman_by_hand() -> None:
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    # ranks (1,2,3) and (1,3,2): 1 - 6·(0+1+1)/(3·8) = 0.5
    assert spearman([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert math.isnan(spearman([1.0], [2.0]))


def test_bad_fits_are_rejected() -> None:
    with pytest.raises(ConfigError, match="hidden_fraction must be a finite number"):
        _step_fit(hidden_fraction=1.5)
    with pytest.raises(ConfigError, match="vector_time_factor"):
        _step_fit(vector_time_factor=0.5)
    with pytest.raises(ConfigError, match="alias"):
        _step_fit(gradient_reduce_dtype="fp32")
    with pytest.raises(ConfigError, match="activation_factor"):
        _memory_fit(activation_factor=0.0)


# --------------------------------------------------------------------------------------
# Features of a real plan


TINY = ModelConfig(name="tiny", d=1024, f=4096, n=8, k=8, h=128, layers=4, vocab=8192)


def _tiny_plan(
    strategy: str = "dp=dp,sp=tp", mesh: str = "pp=1,dp=2,tp=4", **training: object
) -> ModelPlan:
    h100 = load_preset("h100")
    plan = plan_model(
        TINY,
        DeviceMesh.create(h100, mesh, "1x8"),
        strategy,
        Training(batch_tokens=8 * 2048, seq_len=2048, **training),  # type: ignore[arg-type]
    )
    assert isinstance(plan, ModelPlan)
    return plan


def _identity_calibration() -> Calibration:
    """The h100 file with a bf16 GEMM fit that is exactly the roofline."""
    shipped = load_calibration("h100")
    assert shipped is not None
    roofline = MatmulFit(
        lhs_dtype="bfloat16",
        rhs_dtype="bfloat16",
        out_dtype="bfloat16",
        launch_floor_s=0.0,
        compute_efficiency=1.0,
        hbm_efficiency=1.0,
        k_overhead_elements=0.0,
        tile_m=1,
        tile_n=1,
        tile_k=1,
        tile_source="test",
        interval=INTERVAL,
        num_calibration_rows=1,
        data_key="test",
    )
    return dataclasses.replace(shipped, matmul=(roofline,))


def test_a_roofline_gemm_fit_gives_the_planners_matmul_time() -> None:
    """With a GEMM fit equal to the roofline, the features' matmul seconds are the
    planner's own per-op times (every einsum of one microbatch, forward and backward)."""
    plan = _tiny_plan()
    features = step_features(plan, _identity_calibration())
    expected = 0.0
    for _, part in plan.parts:
        for op in part.ops:
            if op.op.kind is OpKind.EINSUM and op.op.phase is not Phase.OPTIMIZER:
                # the planner's compute (causal kernels at half the FLOPs) and HBM bytes
                # (flash attention's scores stay on chip)
                expected += part.layers * max(op.cost.compute_s, op.cost.hbm_s)
    assert features.matmul_s == pytest.approx(expected, rel=1e-9)
    assert features.layers == TINY.layers
    assert features.tp_ring_steps == 3
    assert features.stages == 1
    assert features.uncalibrated == ()


def test_gradient_reductions_are_bucketed_once_per_step() -> None:
    """Four microbatches take as long per slot as one (same microbatch), and the gradient
    reduction is one term per step."""
    calibration = load_calibration("h100")
    one = step_features(_tiny_plan(microbatches=1), calibration, gradient_reduce_dtype="float32")
    four = step_features(_tiny_plan(microbatches=4), calibration, gradient_reduce_dtype="float32")
    assert four.microbatches == 4
    assert four.gradient_s > 0
    bf16 = step_features(_tiny_plan(microbatches=4), calibration, gradient_reduce_dtype="bfloat16")
    assert bf16.gradient_s < four.gradient_s  # half the bytes
    assert one.gradient_s == pytest.approx(four.gradient_s)  # the same parameters


def test_fewer_microbatches_than_stages_shrink_the_activations_in_flight() -> None:
    plan = _tiny_plan("dp=dp,sp=tp,pp=pp", "pp=2,dp=1,tp=4", microbatches=2)
    calibration = load_calibration("h100")
    full = step_features(plan, calibration)
    one = step_features(plan, calibration, microbatches=1)
    assert full.slots == 3
    assert one.slots == 2
    assert one.activation_bytes == pytest.approx(full.activation_bytes / 2)


def test_calibrated_plan_on_h100() -> None:
    plan = _tiny_plan(microbatches=2)
    figure = calibrate_model_plan(plan)
    assert isinstance(figure, CalibratedModelTime)
    assert figure.step_s is not None
    assert figure.tokens_per_s_per_chip is not None
    calibration = load_calibration("h100")
    assert calibration is not None
    assert calibration.step is not None
    features = step_features(
        plan, calibration, gradient_reduce_dtype=calibration.step.gradient_reduce_dtype
    )
    base = step_time_s(calibration.step, features)
    # the stall, summarised as the shipped decision says (StallDecision's docstring)
    stall = calibration.stall
    assert stall is not None
    assert figure.memory_per_chip_bytes is not None
    p = stall_probability(
        stall, features, memory_bytes=figure.memory_per_chip_bytes, capacity_bytes=80e9
    )
    extra = stall_time_s(stall, features)
    share = {
        StallDecision.MEDIAN: float(p >= 0.5),
        StallDecision.MEAN: p,
        StallDecision.RELATIVE_ERROR: float(p * (base + extra) / base > 1 - p),
    }[stall.decision]
    assert figure.stall_probability == pytest.approx(p)
    assert figure.step_s == pytest.approx(base + share * extra)
    assert dict(figure.breakdown_s)["stall"] == pytest.approx(share * extra)
    assert figure.unstalled_step_s == pytest.approx(base)
    assert figure.as_dict()["stall"]["unstalled_step_time_s"] == pytest.approx(base)
    assert figure.tokens_per_s_per_chip == pytest.approx(
        plan.training.batch_tokens / figure.step_s / plan.mesh.num_devices
    )
    assert figure.step_s >= features.slots * features.matmul_s  # never faster than its GEMMs
    assert sum(value for _, value in figure.breakdown_s) == pytest.approx(figure.step_s)
    low, high = figure.step_interval_s or (0.0, 0.0)
    assert low <= figure.step_s <= high
    assert figure.roofline_step_s == plan.step_lower_s
    assert "h100.json" in figure.source


@pytest.mark.parametrize("preset", ["tpu-v5e", "b200"])
def test_presets_without_a_step_fit_keep_the_roofline(preset: str) -> None:
    hardware = load_preset(preset)
    spec, topology = ("x=2,y=4", "2x4") if preset.startswith("tpu") else ("x=2,y=4", "1x8")
    plan = plan_model(
        TINY,
        DeviceMesh.create(hardware, spec, topology),
        "dp=x,sp=y",
        Training(batch_tokens=8 * 2048, seq_len=2048),
    )
    assert isinstance(plan, ModelPlan)
    figure = calibrate_model_plan(plan)
    assert not figure.is_calibrated
    assert figure.step_s is None
    assert figure.fits is None
    assert figure.roofline_step_s == plan.step_lower_s
    expected = "no calibration data for" if preset.startswith("tpu") else "no training-step"
    assert expected in figure.source
    assert "roofline only" in figure.source
    assert "roofline only" in figure.describe()[0]


# --------------------------------------------------------------------------------------
# The runs' mappings


def _row(**cells: str) -> sd.Row:
    base = {
        "run_id": "7", "model": "8B", "nodes": "4", "dp": "2", "tp": "4", "pp": "4",
        "zero_stage": "1", "micro_batch_size": "2", "grad_accum_steps": "2", "seq_len": "4096",
        "tokens_per_s_per_gpu": "1000", "gpu_memory_GB": "40", "status": "ok",
        "n_measured_same_config": "1",
    }  # fmt: skip
    return sd.Row(index=6, cells={**base, **cells})


def test_playbook_run_layout() -> None:
    run = PlaybookRun.from_row(_row(), sd.PLAYBOOK_RUNS_FILE)
    layout = run.layout()
    assert layout.mesh_spec == "pp=4,dp=2,tp=4"  # nanotron's (pp, dp, tp) rank order
    assert layout.topology == "4x8"
    assert layout.strategy == "dp=dp,sp=tp,pp=pp,zero=1,regather=1"
    # 2 microbatches cannot fill 4 stages in the planner: plan 4, cost 2
    assert layout.training.microbatches == 4
    assert layout.microbatches == 2
    assert layout.training.batch_tokens == 2 * 2 * 4 * 4096
    assert layout.training.schedule is Schedule.ONE_F_ONE_B
    assert run.batch_tokens == 2 * 2 * 2 * 4096
    assert run.measured_step_s == pytest.approx(run.batch_tokens / (1000 * 32))
    assert run.memory_bytes == 40e9
    enough = PlaybookRun.from_row(_row(grad_accum_steps="8"), sd.PLAYBOOK_RUNS_FILE).layout()
    assert enough.training.microbatches == 8
    assert enough.microbatches is None


def test_playbook_run_with_the_wrong_gpu_count_is_an_error() -> None:
    with pytest.raises(ConfigError, match="is not 4 nodes of 8"):
        PlaybookRun.from_row(_row(dp="1"), sd.PLAYBOOK_RUNS_FILE).layout()


def test_torchtitan_layout() -> None:
    cells = {
        "table": "Table 6", "row_label": "FSDP 4, CP 2", "model": "Llama 3.1 405B",
        "num_gpus": "512", "fsdp": "4", "tp": "8", "pp": "8", "cp": "2",
        "local_batch_size": "8", "global_batch_size": "", "seq_len": "65536",
        "activation_checkpointing": "full", "float8": "yes", "torch_compile": "yes",
        "async_tp": "yes", "pp_schedule": "1F1B", "tps_per_gpu": "47", "memory_GiB": "75.9",
    }  # fmt: skip
    run = TorchtitanRun.from_row(sd.Row(index=15, cells=cells))
    layout = run.layout()
    assert layout.mesh_spec == "pp=8,fsdp=4,cp=2,tp=8"
    assert layout.strategy == "fsdp=fsdp+cp,cp=cp,sp=tp,pp=pp"
    assert layout.training.batch_tokens == 8 * 4 * 65536  # local batch x data-parallel degree
    assert layout.training.microbatches == 8  # microbatches of one sequence
    assert run.memory_bytes == pytest.approx(75.9 * 2**30)
    assert "float8 (yes)" in run.not_modelled
    assert "async TP" in run.not_modelled


# --------------------------------------------------------------------------------------
# The split and the shipped fit (need the shared data)


def _csv(name: str) -> list[dict[str, str]]:
    assert DATA is not None
    with (DATA / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


@functools.cache
def _calibration_runs() -> list[training.PlannedRun]:
    assert DATA is not None
    return training.plan_calibration_runs(DATA, load_calibration("h100"))  # type: ignore[arg-type]


@needs_data
@pytest.mark.slow
def test_the_step_fit_reads_exactly_the_calibration_runs() -> None:
    runs = _calibration_runs()
    expected = {
        i
        for i, r in enumerate(_csv(sd.PLAYBOOK_RUNS_FILE))
        if r["model"] in ("1B", "8B") and 1 <= int(r["nodes"]) <= 8
    }
    assert {r.run.index for r in runs} == expected
    assert len(expected) == 432
    held = training.PlannedRun(
        run=runs[0].run,
        split=sd.Split.HELDOUT,
        layout=runs[0].layout,
        plan=runs[0].plan,
        features=runs[0].features,
    )
    with pytest.raises(ConfigError, match="calibration split only"):
        training.fit_playbook([*runs[:5], held])


@needs_data
@pytest.mark.slow
def test_shipped_step_and_memory_are_the_benchmarks_fit() -> None:
    """Refit on the calibration runs with the shipped GEMM and collective fits: the shipped
    training-step and memory parameters are what ``benchmarks/calibration.py`` derives."""
    assert DATA is not None
    shipped = load_calibration("h100")
    assert shipped is not None
    assert shipped.step is not None
    assert shipped.memory is not None
    fitted = training.fit_playbook(_calibration_runs())
    # rel 1e-4: the benchmark fits the step on its in-memory GEMM and collective fits and
    # writes 6 significant digits; refitting on the written ones moves flat directions a bit
    for name in (*STEP_PARAMETERS, "gradient_reduce_dtype", "num_calibration_rows"):
        expected = getattr(fitted.step, name)
        actual = getattr(shipped.step, name)
        assert actual == (
            pytest.approx(expected, rel=1e-4) if isinstance(expected, float) else expected
        ), name
    assert shipped.stall is not None
    for name in (
        "stall_per_exchange_s",
        "hazard_per_node_pipelined",
        "hazard_per_node_unpipelined",
        "memory_pressure_fraction",
        "memory_pressure_probability",
        "hazard_per_node_pipelined_zero0",
        "stall_ratio",
        "num_stalled_rows",
    ):
        assert getattr(shipped.stall, name) == pytest.approx(
            getattr(fitted.stall, name), rel=1e-3, abs=1e-9
        ), name
    assert shipped.stall.decision is fitted.stall.decision
    for name in ("persistent_factor", "activation_factor", "workspace_bytes", "capacity_bytes"):
        assert getattr(shipped.memory, name) == pytest.approx(
            getattr(fitted.memory, name), rel=1e-5
        )
    assert shipped.step.interval.low_ratio == pytest.approx(
        fitted.step.interval.low_ratio, rel=1e-5
    )
    assert shipped.step.interval.high_ratio == pytest.approx(
        fitted.step.interval.high_ratio, rel=1e-5
    )
    names = {f.name for f in shipped.source.data_files}
    assert {sd.PLAYBOOK_RUNS_FILE, sd.PLAYBOOK_MODELS_FILE} <= names
    assert not names & {sd.PLAYBOOK_FAILED_FILE, sd.TORCHTITAN_FILE}  # held out


def test_results_json_has_the_issues_fields() -> None:
    data = json.loads((REPO / "benchmarks" / "results" / "calibration.json").read_text())
    playbook = data["playbook"]
    for key in (
        "heldout_mape",
        "spearman_median",
        "best_within_10pct_share",
        "memory_call_accuracy",
    ):
        assert 0 <= playbook[key] <= 100, key  # fractions (a MAPE may exceed 1)
    assert 0 <= playbook["spearman_median"] <= 1
    assert 0 <= playbook["memory_call_accuracy"] <= 1
    assert playbook["groups"]
    for group in playbook["groups"].values():
        assert {"runs", "mape", "spearman", "best_within_10pct"} <= set(group)
    assert {"mape_tps", "mape_memory"} <= set(data["torchtitan"])


# --------------------------------------------------------------------------------------
# model --calibrated


MODEL = [
    "model", "--config", "configs/models/llama3-8b.toml", "--batch-tokens", "1048576",
    "--seq-len", "4096",
]  # fmt: skip
H100 = [
    "--hardware",
    "h100",
    "--topology",
    "2x8",
    "--mesh",
    "dp=2,tp=8",
    "--strategy",
    "dp=dp,sp=tp",
]


def test_model_calibrated_json(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main([*MODEL, *H100, "--microbatches", "8", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert main([*MODEL, *H100, "--microbatches", "8", "--calibrated", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    strategy = data["strategies"][0]
    # every field of the plain output is still there, unchanged
    base = plain["strategies"][0]
    assert {k: v for k, v in strategy.items() if k != "calibrated"} == base
    assert "calibrated" not in base
    calibrated = strategy["calibrated"]
    for key in (
        "step_time_s",
        "mfu",
        "tokens_per_s_per_chip",
        "memory_per_chip_bytes",
        "interval",
        "source",
    ):
        assert key in calibrated
    assert calibrated["step_time_s"] > 0
    assert calibrated["tokens_per_s_per_chip"] == pytest.approx(
        data["batch_tokens"] / calibrated["step_time_s"] / 16
    )
    low, high = calibrated["interval"]["step_time_s"]
    assert low <= calibrated["step_time_s"] <= high
    assert calibrated["roofline"]["step_time_s"] == base["step_time_s"]["lower_bound"]
    assert "h100.json" in calibrated["source"]


def test_model_calibrated_text(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    assert main([*MODEL, *H100, "--microbatches", "8", "--calibrated"]) == 0
    text = capsys.readouterr().out
    assert "calibrated step" in text
    assert ", roofline " in text
    assert "tokens/s per chip" in text
    assert "calibrated memory" in text
    assert "calibration: h100.json" in text
    assert main([*MODEL, *H100, "--microbatches", "8"]) == 0
    assert "calibrated" not in capsys.readouterr().out  # off by default


def test_model_calibrated_on_a_tpu_says_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)
    tpu = [
        "--hardware",
        "tpu-v5p",
        "--topology",
        "4x4x4",
        "--mesh",
        "x=4,y=4,z=4",
        "--strategy",
        "fsdp=x+y,sp=z",
    ]
    assert main([*MODEL, *tpu, "--calibrated"]) == 0
    assert "no calibration data for tpu-v5p: roofline only" in capsys.readouterr().out
    assert main([*MODEL, *tpu, "--calibrated", "--json"]) == 0
    calibrated = json.loads(capsys.readouterr().out)["strategies"][0]["calibrated"]
    assert calibrated["step_time_s"] is None
    assert calibrated["roofline"]["step_time_s"] > 0
    assert "roofline only" in calibrated["source"]


def test_zero_microbatches_is_an_error() -> None:
    with pytest.raises(SpecError, match="microbatches=0 must be at least 1"):
        calibrate_model_plan(_tiny_plan(), microbatches=0)


def test_stall_probability_and_size() -> None:
    """``StallFit``: the per-node hazard, the memory-pressure term and the stall's size."""
    stall = _stall_fit()
    base = _features(stages=4, microbatches=8, nodes=8)
    p = stall_probability(stall, base, memory_bytes=1e9, capacity_bytes=80e9)
    assert p == pytest.approx(1 - 0.98**8)
    high = stall_probability(stall, base, memory_bytes=70e9, capacity_bytes=80e9)
    assert high == pytest.approx(1 - 0.98**8 * 0.5)
    # two neighbours (P >= 3): 2 exchanges per slot, (m + P - 1) slots
    assert stall_time_s(stall, base) == pytest.approx(11 * 2 * 0.5)
    flat = dataclasses.replace(base, stages=1, nodes=64)
    assert stall_probability(stall, flat, memory_bytes=1e9, capacity_bytes=80e9) == 0.0
    assert stall_time_s(stall, flat) == pytest.approx(8 * 1 * 0.5)
    # a class of its own for pipelined ZeRO-0 data-parallel runs, when the fit has one
    zero0 = dataclasses.replace(base, data_parallel=4, zero=0)
    assert stall_probability(stall, zero0, memory_bytes=1e9, capacity_bytes=80e9) == p
    classed = dataclasses.replace(stall, hazard_per_node_pipelined_zero0=0.1)
    assert stall_probability(classed, zero0, memory_bytes=1e9, capacity_bytes=80e9) == (
        pytest.approx(1 - 0.9**8)
    )
    for other in (
        dataclasses.replace(zero0, zero=1),  # the optimizer state sharded
        dataclasses.replace(zero0, data_parallel=1),  # no data parallelism
    ):
        assert stall_probability(classed, other, memory_bytes=1e9, capacity_bytes=80e9) == p
    unpipelined = dataclasses.replace(zero0, stages=1, nodes=64)
    assert stall_probability(classed, unpipelined, memory_bytes=1e9, capacity_bytes=80e9) == 0.0


@pytest.mark.parametrize(
    ("decision", "probability", "ratio", "share"),
    [
        ("median", 0.49, 20.0, 0.0),
        ("median", 0.5, 1.1, 1.0),
        ("mean", 0.3, 20.0, 0.3),
        ("mean", 0.0, 5.0, 0.0),
        # P·r > 1 - P: 0.1·20 = 2 > 0.9, the stalled outcome; 0.1·5 = 0.5 < 0.9, not
        ("relative-error", 0.1, 20.0, 1.0),
        ("relative-error", 0.1, 5.0, 0.0),
        ("relative-error", 0.6, 1.1, 1.0),
    ],
)
def test_stall_decisions(decision: str, probability: float, ratio: float, share: float) -> None:
    """``StallDecision``: the share of a stall the calibrated step carries."""
    stall = _stall_fit(decision=decision)  # a string is taken, by value
    assert stall.decision is StallDecision(decision)
    assert stall.share(probability, ratio) == pytest.approx(share)


def test_stall_decision_must_be_known() -> None:
    with pytest.raises(ConfigError, match="decision 'mode'; expected one of 'median', 'mean'"):
        _stall_fit(decision="mode")


def _stall_rows(seed: int = 0, runs: int = 400) -> training.StallRows:
    """Synthetic calibration runs: pipelined ZeRO-0 data-parallel runs stall with a per-node
    hazard of 0.2, the others of 0.005; a stall costs 0.5 s per slot and exchange."""
    rng = np.random.default_rng(seed)
    nodes = rng.choice([1, 2, 4, 8], runs).astype(float)
    pipelined = rng.random(runs) < 0.6
    zero0 = rng.random(runs) < 0.4
    hazard = np.where(pipelined & zero0, 0.2, 0.005)
    stalled = rng.random(runs) < 1 - (1 - hazard) ** nodes
    stall_exchanges = rng.choice([4.0, 8.0, 16.0], runs)
    base = rng.uniform(1.0, 10.0, runs)
    measured = base * rng.uniform(0.9, 1.1, runs) + np.where(stalled, 0.5 * stall_exchanges, 0.0)
    return training.StallRows(
        stalled=stalled,
        excess_per_exchange_s=(measured - base) / stall_exchanges,
        nodes=nodes,
        pipelined=pipelined,
        zero0_data_parallel=zero0,
        memory_share=rng.uniform(0.1, 0.7, runs),
        stall_exchanges=stall_exchanges,
        base_step_s=base,
        measured_step_s=measured,
        group=np.array([f"m/{int(n)}" for n in nodes]),
    )


@pytest.mark.slow
def test_fit_stall_finds_the_zero0_class_and_its_hazards() -> None:
    """On runs drawn from a known stall model, ``fit_stall`` picks a form with the ZeRO-0
    class and recovers its hazards and the stall's size; it reports every decision's CV
    scores and ships the expectation."""
    rows = _stall_rows()
    stall, report = training.fit_stall(rows, rows.stalled.size)
    assert "ZeRO-0 pipelined class" in report["probability_selection"]["chosen"]
    assert stall.hazard_per_node_pipelined_zero0 == pytest.approx(0.2, abs=0.05)
    assert stall.hazard_per_node_pipelined == pytest.approx(0.005, abs=0.005)
    assert stall.stall_per_exchange_s == pytest.approx(0.5, abs=0.05)
    scores = report["decision_selection"]["cross_validation"]
    assert set(scores) == {d.value for d in StallDecision}
    assert stall.decision is training.SHIPPED_DECISION is StallDecision.MEAN


def test_decision_scores_by_hand() -> None:
    """``decision_scores``: tokens/s MAPE |measured step / predicted - 1|, and the median of
    the groups' Spearman (groups of at least 3 runs)."""
    rows = dataclasses.replace(
        _stall_rows(runs=7),
        measured_step_s=np.array([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 5.0]),
        group=np.array(["a", "a", "a", "a", "b", "b", "b"]),
    )
    steps = np.array([1.0, 2.0, 4.0, 3.0, 2.0, 1.0, 5.0])
    mape, rho = training.decision_scores(rows, steps)
    errors = [0, 0, 0.25, 1 / 3, 0.5, 1.0, 0]
    assert mape == pytest.approx(sum(errors) / 7)
    # group a: ranks 1,2,4,3 against 1,2,3,4: rho = 1 - 6·2/(4·15) = 0.8; group b: ranks
    # 2,1,3 against 1,2,3: rho = 1 - 6·2/(3·8) = 0.5; median 0.65
    assert rho == pytest.approx(0.65)
    steps_s = training.decision_steps(rows, np.full(7, 0.25), 0.5, StallDecision.MEAN)
    assert steps_s == pytest.approx(rows.base_step_s + 0.25 * 0.5 * rows.stall_exchanges)
