"""Fit the calibration on the fixed calibration split; report held-out error beside the roofline.

    .venv/bin/python benchmarks/calibration.py [--data-dir DIR] [--no-write]

Reads the public measurements in the shared data folder (``$SR_SHARED_DATA``, else
``<repo>/../shared/data``; see its README.md), applies the fixed split
(``sharding_roofline.calibration.data``: a row's index is its 0-based position under the
header, and the XLA perf-table rows with an even index are the calibration rows), and:

1. Matmul (``xla_h100_matmul.csv``, ``xla_b200_matmul.csv``): fits the achieved-time model
   per (GPU, dtype key) on the even rows, and prints the held-out (odd-row) throughput error
   |pred - meas|/meas, median and 90th percentile, beside the uncalibrated roofline's error
   on the same rows (the presets' datasheet peaks). An ablation table shows why the model
   has the terms it has.
2. Collectives in one NVLink domain (``xla_gpu_collectives.csv``: H100, B200, GB200): fits
   latency, pipeline latency and bus bandwidth per (op, group size, permute pattern) on the
   even rows; prints held-out time error per op and GPU for messages of at least 1 MiB and
   below, beside the roofline (``collectives.collective_cost`` on the preset's mesh).
3. Collectives across nodes (``playbook_collectives.csv``, H100): fits a latency per ring
   step and a bus bandwidth per op on the 1-8 node rows; prints every 16-64 node row
   (held out) against the calibrated and roofline times.

It writes the fitted parameters into the package (``src/sharding_roofline/calibration/
<preset>.json``: parameters only, with the data files' SHA-256, the split, this command
and the date) and the errors into ``benchmarks/results/calibration.json`` (fractions, not
percent). The held-out figures are evaluated through the package's public API from the
files just written, so they are the shipped files' errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import subprocess
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sharding_roofline import DeviceMesh, load_preset
from sharding_roofline.calibration import (
    Calibration,
    CalibrationSource,
    CollectiveFit,
    CollectiveInterval,
    MatmulFit,
    RatioInterval,
    StallDecision,
    calibrate_model_plan,
    calibrated_collective,
    calibrated_matmul,
    load_calibration,
    training,
    write_calibration,
)
from sharding_roofline.calibration import data as sd
from sharding_roofline.calibration.fit import (
    CollectiveRows,
    MatmulRows,
    collective_predict,
    fit_collective_bucket,
    fit_collective_ring,
    fit_matmul,
    fold_masks,
    least_squares_log,
    matmul_predict,
    ratio_quantiles,
)
from sharding_roofline.calibration.model import (
    LARGE_MESSAGE_BYTES,
    DataFile,
)
from sharding_roofline.calibration.runs import RunPlanner, TorchtitanRun, spearman
from sharding_roofline.collectives import Collective
from sharding_roofline.dtypes import canonical_dtype, dtype_bytes
from sharding_roofline.hardware import HardwareSpec, LinkKind
from sharding_roofline.plans import Rejected

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "calibration.json"
PACKAGE_DIR = REPO / "src" / "sharding_roofline" / "calibration"
COMMAND = "python benchmarks/calibration.py"

#: Which shipped preset each GPU of the data is (the data's "gpu" column).
PRESETS = {"H100": "h100", "B200": "b200", "GB200": "gb200-nvl72"}
DESCRIPTIONS = {
    "h100": "H100 SXM: XLA's sm_90 GEMM and collective perf tables (one 8-GPU host) and the "
    "Ultra-Scale Playbook's cross-node bandwidth sweep",
    "b200": "B200: XLA's sm_100_B200 GEMM and collective perf tables (one 8-GPU host); no "
    "cross-node data",
    "gb200-nvl72": "GB200 NVL72: XLA's sm_100_GB200 collective perf table (64 or 72 GPUs of "
    "one NVLink domain); no GEMM and no cross-node data",
}

#: The data's dtype keys, and whether the fit ships. XLA's "f32" dot runs on TF32 tensor
#: cores at its default precision, but the presets' float32 peak is non-tensor FP32 (67
#: TFLOP/s on H100), so a float32 calibration would beat the datasheet: it is fitted and
#: reported here, with efficiencies allowed above 1, and not shipped.
DTYPE_KEYS = (
    "bf16xbf16->bf16",
    "f8e4m3fnxf8e4m3fn->bf16",
    "f8e4m3fnxf8e5m2->bf16",
    "f8e5m2xf8e4m3fn->bf16",
    "f32xf32->f32",
)
UNSHIPPED_KEYS = {"f32xf32->f32": "TF32 dot vs the presets' non-tensor FP32 peak"}
TILE = (128, 128, 64)
TILE_SOURCE = (
    "assumed, not fitted: a 128x128 output tile and a 64-deep k step, a common Hopper and "
    "Blackwell GEMM tile; every calibration shape is a multiple of 256, so the data cannot "
    "tell tile sizes apart and rounding up never changes a calibration row"
)
#: SMs per GPU, for the wave-quantization ablation only (scaling book gpus.md, "SMs").
NUM_SMS = {"H100": 132, "B200": 148}

PERMUTE_PATTERNS = {
    "ring_i_to_i_plus_1": "ring",
    "two_way_mutual_pairs": "pairs",
    "one_way_i_to_i_plus_n/2": "half",
}
PLAYBOOK_OPS = {
    "AllReduce": Collective.ALL_REDUCE,
    "AllGather": Collective.ALL_GATHER,
    "ReduceScatter": Collective.REDUCE_SCATTER,
}
#: The Playbook sweep's "256 MB", read as 256 MiB (2^28 bytes): the source does not say.
PLAYBOOK_MESSAGE_BYTES = 256 * 2**20
GPUS_PER_NODE = 8


def error_stats(errors: Sequence[float]) -> dict[str, float]:
    values = np.asarray(errors, dtype=float)
    return {
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "rows": int(values.size),
    }


def rel_error(predicted: float, measured: float) -> float:
    return abs(predicted - measured) / measured


def pct(x: float) -> str:
    return f"{100 * x:6.1f}%"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            check=False,
            capture_output=True,
            text=True,
            cwd=REPO,
        )
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


# == matmul ===================================================================================


@dataclass(frozen=True, slots=True)
class MatmulRow:
    index: int
    split: sd.Split
    batch: int
    m: int
    n: int
    k: int
    lhs: str
    rhs: str
    out: str
    time_s: float

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.m * self.n * self.k

    @property
    def hbm_bytes(self) -> float:
        return float(
            self.batch
            * (
                self.m * self.k * dtype_bytes(self.lhs)
                + self.k * self.n * dtype_bytes(self.rhs)
                + self.m * self.n * dtype_bytes(self.out)
            )
        )


def load_matmul(data_dir: Path, gpu: str) -> dict[str, list[MatmulRow]]:
    name = sd.MATMUL_FILES[gpu]
    out: dict[str, list[MatmulRow]] = defaultdict(list)
    for row in sd.read_rows(data_dir, name):
        flops = float(row["matmul_flops"])
        out[row["dtype_key"]].append(
            MatmulRow(
                index=row.index,
                split=sd.split_of(name, row),
                batch=int(row["b"]),
                m=int(row["m"]),
                n=int(row["n"]),
                k=int(row["k"]),
                lhs=canonical_dtype(row["lhs_dtype"]),
                rhs=canonical_dtype(row["rhs_dtype"]),
                out=canonical_dtype(row["out_dtype"]),
                time_s=flops / float(row["flops_per_sec"]),  # the source value is FLOP/s
            )
        )
    return out


def as_rows(rows: Sequence[MatmulRow]) -> MatmulRows:
    return MatmulRows(
        batch=np.array([r.batch for r in rows], dtype=float),
        m=np.array([r.m for r in rows], dtype=float),
        n=np.array([r.n for r in rows], dtype=float),
        k=np.array([r.k for r in rows], dtype=float),
        hbm_bytes=np.array([r.hbm_bytes for r in rows]),
        time_s=np.array([r.time_s for r in rows]),
    )


def peak_for(hardware: HardwareSpec, row: MatmulRow) -> float:
    chip = hardware.chip
    return min(chip.peak_flops_per_s_for(row.lhs), chip.peak_flops_per_s_for(row.rhs))


def roofline_time_s(hardware: HardwareSpec, row: MatmulRow) -> float:
    return max(row.flops / peak_for(hardware, row), row.hbm_bytes / hardware.chip.hbm_bytes_per_s)


# -- model variants, chosen by cross-validation on the calibration rows ---------------------

#: The matmul model's candidate forms. The package formula (``model.matmul_time_s``) covers
#: the first two (the first is the second with ``k_overhead_elements = 0``); the third adds
#: wave quantization over the SMs and exists here only as a candidate.
MATMUL_VARIANTS = ("floor + max(compute, HBM)", "+ k overhead", "+ wave quantization over SMs")
PACKAGE_VARIANTS = frozenset(MATMUL_VARIANTS[:2])
NUM_FOLDS = 5

Predictor = Callable[[MatmulRows], np.ndarray]


def wave_predict(
    params: Sequence[float], rows: MatmulRows, *, peak: float, hbm: float, sms: int
) -> np.ndarray:
    """The package formula with wave quantization: the compute term divided by the busy
    fraction of the SMs over all waves of 128x128 output tiles."""
    floor_s, compute_eff, hbm_eff, k_overhead = params
    tiles = rows.batch * np.ceil(rows.m / TILE[0]) * np.ceil(rows.n / TILE[1])
    fill = tiles / (np.ceil(tiles / sms) * sms)
    flops = 2 * rows.batch * rows.m * rows.n * (rows.k + k_overhead)
    compute = flops / (compute_eff * peak * fill)
    result: np.ndarray = floor_s + np.maximum(compute, rows.hbm_bytes / (hbm_eff * hbm))
    return result


def fit_wave(
    rows: MatmulRows, *, peak: float, hbm: float, sms: int, top: float
) -> tuple[float, ...]:
    def unpack(theta: np.ndarray) -> tuple[float, ...]:
        values = np.exp(theta)
        return (*(float(v) for v in values[:3]), float(values[3] - 1.0))

    def residuals(theta: np.ndarray) -> np.ndarray:
        predicted = wave_predict(unpack(theta), rows, peak=peak, hbm=hbm, sms=sms)
        out: np.ndarray = np.log(predicted) - np.log(rows.time_s)
        return out

    floor = float(np.min(rows.time_s))
    theta = least_squares_log(
        residuals,
        [[np.log(floor), np.log(0.7), np.log(0.7), np.log(129.0)]],
        log_low=[np.log(1e-7), np.log(0.01), np.log(0.01), 0.0],
        log_high=[np.log(1e-3), np.log(top), np.log(top), np.log(65537.0)],
    )
    return unpack(theta)


def fit_variant(
    variant: str, rows: MatmulRows, *, peak: float, hbm: float, sms: int, top: float
) -> tuple[tuple[float, ...], Predictor]:
    """Fit ``variant`` to ``rows``: its parameters and a predictor for other rows."""
    if variant in PACKAGE_VARIANTS:
        result = fit_matmul(
            rows,
            peak_flops_per_s=peak,
            hbm_bytes_per_s=hbm,
            tile=TILE,
            max_efficiency=top,
            fit_k_overhead=variant == "+ k overhead",
        )
        params = result.params

        def package(other: MatmulRows) -> np.ndarray:
            return matmul_predict(
                params, other, peak_flops_per_s=peak, hbm_bytes_per_s=hbm, tile=TILE
            )

        return params, package
    wave_params = fit_wave(rows, peak=peak, hbm=hbm, sms=sms, top=top)

    def wave(other: MatmulRows) -> np.ndarray:
        return wave_predict(wave_params, other, peak=peak, hbm=hbm, sms=sms)

    return wave_params, wave


def out_of_fold(rows: MatmulRows, fit: Callable[[MatmulRows], Predictor]) -> np.ndarray:
    """Each calibration row predicted by a fit to the other folds (measured/predicted)."""
    ratios = np.empty(rows.time_s.size)
    for fold in fold_masks(rows.time_s.size, NUM_FOLDS):
        predictor = fit(rows.subset(~fold))
        ratios[fold] = rows.time_s[fold] / predictor(rows.subset(fold))
    return ratios


def errors_of(ratios: np.ndarray) -> np.ndarray:
    """|pred - meas| / meas from measured/predicted ratios."""
    result: np.ndarray = np.abs(1.0 / ratios - 1.0)
    return result


@dataclass(frozen=True, slots=True)
class MatmulCase:
    gpu: str
    key: str
    hardware: HardwareSpec
    calibration_rows: list[MatmulRow]
    heldout_rows: list[MatmulRow]

    @property
    def peak(self) -> float:
        return peak_for(self.hardware, self.calibration_rows[0])

    @property
    def top(self) -> float:
        """The efficiency bound of the fit: 1 (the datasheet), except the unshipped f32."""
        return 100.0 if self.key in UNSHIPPED_KEYS else 1.0

    def fit(self, variant: str, rows: MatmulRows) -> tuple[tuple[float, ...], Predictor]:
        return fit_variant(
            variant,
            rows,
            peak=self.peak,
            hbm=self.hardware.chip.hbm_bytes_per_s,
            sms=NUM_SMS[self.gpu],
            top=self.top,
        )


def select_matmul_variant(
    cases: list[MatmulCase],
) -> tuple[str, dict[str, Any], dict[tuple[str, str, str], np.ndarray]]:
    """The variant with the lowest median cross-validated error over the calibration rows of
    every shipped (GPU, dtype key); also each case's out-of-fold ratios per variant."""
    oof: dict[tuple[str, str, str], np.ndarray] = {}
    pooled: dict[str, list[float]] = {v: [] for v in MATMUL_VARIANTS}
    for case in cases:
        rows = as_rows(case.calibration_rows)
        for variant in MATMUL_VARIANTS:

            def fit(sub: MatmulRows, v: str = variant, c: MatmulCase = case) -> Predictor:
                return c.fit(v, sub)[1]

            ratios = out_of_fold(rows, fit)
            oof[case.gpu, case.key, variant] = ratios
            if case.key not in UNSHIPPED_KEYS:
                pooled[variant] += list(errors_of(ratios))
    table: dict[str, Any] = {}
    print(
        f"\n== Matmul model selection: {NUM_FOLDS}-fold cross-validation on the calibration "
        "(even) rows only =="
    )
    for variant in MATMUL_VARIANTS:
        stats = error_stats(pooled[variant])
        table[variant] = {"cv_median_error": stats["median"], "cv_p90_error": stats["p90"]}
        print(f"   {variant:32} CV median {pct(stats['median'])}  p90 {pct(stats['p90'])}")
    chosen = min(MATMUL_VARIANTS, key=lambda v: table[v]["cv_median_error"])
    print(f"   chosen: {chosen!r}")
    if chosen not in PACKAGE_VARIANTS:
        raise SystemExit(f"cross-validation chose {chosen!r}, which the package formula lacks")
    return chosen, table, oof


def run_matmul(
    data_dir: Path,
) -> tuple[dict[str, tuple[MatmulFit, ...]], Callable[[], dict[str, Any]]]:
    """Choose the model by cross-validation, fit every (GPU, dtype key) on its calibration
    rows; return the shippable fits per preset and an evaluator to call once the files are
    written (it reads them back)."""
    cases: list[MatmulCase] = []
    for gpu in sd.MATMUL_FILES:
        hardware = load_preset(PRESETS[gpu])
        by_key = load_matmul(data_dir, gpu)
        for key in DTYPE_KEYS:
            rows = by_key[key]
            cases.append(
                MatmulCase(
                    gpu=gpu,
                    key=key,
                    hardware=hardware,
                    calibration_rows=[r for r in rows if r.split is sd.Split.CALIBRATION],
                    heldout_rows=[r for r in rows if r.split is sd.Split.HELDOUT],
                )
            )
    chosen, selection, oof = select_matmul_variant(cases)
    shipped: dict[str, list[MatmulFit]] = defaultdict(list)
    predictors: dict[tuple[str, str], Predictor] = {}
    for case in cases:
        calib = case.calibration_rows
        params, predictor = case.fit(chosen, as_rows(calib))
        predictors[case.gpu, case.key] = predictor
        if case.key in UNSHIPPED_KEYS:
            continue
        floor_s, compute_eff, hbm_eff, k_overhead = params
        ratios = oof[case.gpu, case.key, chosen]
        low, high = ratio_quantiles(ratios)
        shipped[PRESETS[case.gpu]].append(
            MatmulFit(
                lhs_dtype=calib[0].lhs,
                rhs_dtype=calib[0].rhs,
                out_dtype=calib[0].out,
                launch_floor_s=floor_s,
                compute_efficiency=compute_eff,
                hbm_efficiency=hbm_eff,
                k_overhead_elements=k_overhead,
                tile_m=TILE[0],
                tile_n=TILE[1],
                tile_k=TILE[2],
                tile_source=TILE_SOURCE,
                interval=RatioInterval(low_ratio=low, high_ratio=high, num_points=len(ratios)),
                num_calibration_rows=len(calib),
                data_key=f"{sd.MATMUL_FILES[case.gpu]} {case.key}",
            )
        )

    def evaluate() -> dict[str, Any]:
        report: dict[str, Any] = defaultdict(dict)
        print("\n== Matmul: held-out (odd-row) throughput error |pred - meas| / meas ==")
        print(
            f"{'GPU':6} {'dtype key':26} {'rows':>5} {'calibrated median':>18} {'p90':>8}"
            f" {'roofline median':>16} {'p90':>8} {'in interval':>11}  note"
        )
        for case in cases:
            held = case.heldout_rows
            hardware = case.hardware
            roof = [rel_error(roofline_time_s(hardware, r), r.time_s) for r in held]
            above_peak = sum(r.flops / r.time_s > peak_for(hardware, r) for r in held)
            inside: list[bool] = []
            if case.key in UNSHIPPED_KEYS:
                predicted = predictors[case.gpu, case.key](as_rows(held))
                calibrated = [rel_error(p, r.time_s) for p, r in zip(predicted, held, strict=True)]
                note = f"not shipped: {UNSHIPPED_KEYS[case.key]}"
            else:
                calibration = load_calibration(PRESETS[case.gpu])
                calibrated = []
                for r in held:
                    figure = calibrated_matmul(
                        hardware,
                        m=r.m,
                        n=r.n,
                        k=r.k,
                        batch=r.batch,
                        dtype=r.lhs,
                        rhs_dtype=r.rhs,
                        calibration=calibration,
                    )
                    if figure.calibrated_s is None or figure.low_s is None or figure.high_s is None:
                        raise SystemExit(f"{case.key} on {case.gpu}: {figure.source}")
                    calibrated.append(rel_error(figure.calibrated_s, r.time_s))
                    inside.append(figure.low_s <= r.time_s <= figure.high_s)
                note = "shipped"
            if above_peak:
                note += f"; {above_peak} rows measure above the datasheet peak"
            cal, rf = error_stats(calibrated), error_stats(roof)
            coverage = float(np.mean(inside)) if inside else float("nan")
            print(
                f"{case.gpu:6} {case.key:26} {cal['rows']:5d} {pct(cal['median']):>18} "
                f"{pct(cal['p90']):>8} {pct(rf['median']):>16} {pct(rf['p90']):>8} "
                f"{'-' if not inside else pct(coverage):>11}  {note}"
            )
            report[case.gpu][case.key] = {
                "heldout_median_error": cal["median"],
                "heldout_p90_error": cal["p90"],
                "roofline_median_error": rf["median"],
                "roofline_p90_error": rf["p90"],
                "heldout_rows": cal["rows"],
                "heldout_interval_coverage": coverage if inside else None,
                "heldout_rows_above_peak": above_peak,
                "shipped": case.key not in UNSHIPPED_KEYS,
                "note": note,
            }
        ablation = matmul_heldout_by_variant(cases)
        return {
            "per_gpu": dict(report),
            "model_selection": {
                "chosen": chosen,
                "cross_validation": selection,
                "heldout_for_information": ablation,
            },
        }

    return {k: tuple(v) for k, v in shipped.items()}, evaluate


def matmul_heldout_by_variant(cases: list[MatmulCase]) -> dict[str, Any]:
    """Held-out error of every candidate form (for information only: the choice above was
    made by cross-validation on the calibration rows)."""
    errors: dict[str, list[float]] = {v: [] for v in ("roofline", *MATMUL_VARIANTS)}
    for case in cases:
        if case.key in UNSHIPPED_KEYS:
            continue
        held = as_rows(case.heldout_rows)
        errors["roofline"] += [
            rel_error(roofline_time_s(case.hardware, r), r.time_s) for r in case.heldout_rows
        ]
        for variant in MATMUL_VARIANTS:
            _, predictor = case.fit(variant, as_rows(case.calibration_rows))
            errors[variant] += list(np.abs(predictor(held) - held.time_s) / held.time_s)
    print("\n   held-out error of each candidate form (information only, not used to choose):")
    out: dict[str, Any] = {}
    for variant, values in errors.items():
        stats = error_stats(values)
        out[variant] = {"heldout_median_error": stats["median"], "heldout_p90_error": stats["p90"]}
        print(f"   {variant:32} median {pct(stats['median'])}  p90 {pct(stats['p90'])}")
    return out


# == collectives in one NVLink domain =========================================================


@dataclass(frozen=True, slots=True)
class CollectiveRow:
    index: int
    split: sd.Split
    gpu: str
    op: Collective
    group_size: int
    num_devices: int
    pattern: str
    message_bytes: int
    time_s: float


def load_collectives(data_dir: Path) -> list[CollectiveRow]:
    out = []
    for row in sd.read_rows(data_dir, sd.COLLECTIVES_FILE):
        if row["gpu"] not in PRESETS or not row["network_throughput_bytes_per_sec"]:
            continue  # GB300 and gfx950 have no preset; two GB200 rows have no measurement
        op = Collective(row["opcode"])
        total = int(row["num_devices_total"])
        permute = op is Collective.COLLECTIVE_PERMUTE
        message = int(row["message_bytes"])
        out.append(
            CollectiveRow(
                index=row.index,
                split=sd.split_of(sd.COLLECTIVES_FILE, row),
                gpu=row["gpu"],
                op=op,
                group_size=total if permute else int(row["num_devices_per_group"]),
                num_devices=total,
                pattern=row["permute_pattern"] if permute else "",
                message_bytes=message,
                # the source value is message bytes per second
                time_s=message / float(row["network_throughput_bytes_per_sec"]),
            )
        )
    return out


def mesh_for(hardware: HardwareSpec, num_devices: int, group_size: int) -> DeviceMesh:
    """``num_devices`` GPUs of one NVLink domain, in contiguous groups of ``group_size``
    (the data's iota replica groups) along the mesh's minor axis ``y``."""
    return DeviceMesh.create(
        hardware, f"x={num_devices // group_size},y={group_size}", f"1x{num_devices}"
    )


def elements_for(op: Collective, message_bytes: int, group_size: int) -> int:
    """Per-chip int8 elements of ``collective_cost`` whose message (``bus_bytes``'s) is
    ``message_bytes``: the gathered output / group for an AllGather, the buffer otherwise."""
    if op is Collective.ALL_GATHER:
        if message_bytes % group_size:
            raise ValueError(f"{message_bytes} bytes do not gather evenly over {group_size}")
        return message_bytes // group_size
    return message_bytes


def bucket_name(op: Collective, group_size: int, pattern: str) -> str:
    if op is Collective.COLLECTIVE_PERMUTE:
        return f"{op.value} {PERMUTE_PATTERNS[pattern]} on {group_size}"
    return f"{op.value} group {group_size}"


#: Candidate losses for the in-node fits (log-time residuals), chosen by cross-validation.
#: Small-message times are noisy and sometimes bimodal (a 1 KiB AllGather of 2 H100s takes
#: 55 us, its neighbours 12-20 us), which a robust loss may weigh down.
LOSSES: dict[str, float | None] = {"least squares": None, "Huber 0.1": 0.1, "Huber 0.3": 0.3}


def as_collective_rows(members: Sequence[CollectiveRow]) -> CollectiveRows:
    return CollectiveRows(
        ops=tuple(r.op for r in members),
        group_size=np.array([r.group_size for r in members], dtype=float),
        message_bytes=np.array([r.message_bytes for r in members], dtype=float),
        time_s=np.array([r.time_s for r in members]),
    )


def bucket_predictor(
    table: CollectiveRows, *, cap: float, huber: float | None
) -> tuple[tuple[float, ...], Callable[[CollectiveRows], np.ndarray]]:
    result = fit_collective_bucket(table, max_bus_bytes_per_s=cap, huber_scale=huber)
    latency, pipeline, bandwidth = result.params

    def predict(other: CollectiveRows) -> np.ndarray:
        return collective_predict(
            latency, 0.0, pipeline, np.full(other.time_s.size, bandwidth), other
        )

    return result.params, predict


def calibration_buckets(
    rows: list[CollectiveRow],
) -> dict[str, dict[tuple[Collective, int, str], list[CollectiveRow]]]:
    """Per preset: the calibration rows of each (op, group size, permute pattern)."""
    out: dict[str, dict[tuple[Collective, int, str], list[CollectiveRow]]] = {}
    for gpu, preset in PRESETS.items():
        buckets: dict[tuple[Collective, int, str], list[CollectiveRow]] = defaultdict(list)
        for r in rows:
            if r.gpu == gpu and r.split is sd.Split.CALIBRATION:
                buckets[r.op, r.group_size, r.pattern].append(r)
        out[preset] = dict(
            sorted(buckets.items(), key=lambda item: (item[0][0].value, item[0][1], item[0][2]))
        )
    return out


def nvlink_cap(preset: str) -> float:
    nvlink = load_preset(preset).nvlink
    if nvlink is None:
        raise SystemExit(f"{preset} has no NVLink table")
    return nvlink.bytes_per_s_per_gpu_per_direction


def select_loss(
    buckets: dict[str, dict[tuple[Collective, int, str], list[CollectiveRow]]],
) -> tuple[
    str, dict[str, Any], dict[tuple[str, str], dict[tuple[Collective, int, str], np.ndarray]]
]:
    """The loss with the lowest median cross-validated error over every in-node calibration
    row; also each bucket's out-of-fold ratios per loss."""
    pooled: dict[str, list[float]] = {name: [] for name in LOSSES}
    oof: dict[tuple[str, str], dict[tuple[Collective, int, str], np.ndarray]] = defaultdict(dict)
    for preset, per_bucket in buckets.items():
        cap = nvlink_cap(preset)
        for key, members in per_bucket.items():
            table = as_collective_rows(members)
            for name, huber in LOSSES.items():
                ratios = np.empty(table.time_s.size)
                for fold in fold_masks(table.time_s.size, NUM_FOLDS):
                    _, predict = bucket_predictor(table.subset(~fold), cap=cap, huber=huber)
                    ratios[fold] = table.time_s[fold] / predict(table.subset(fold))
                oof[preset, name][key] = ratios
                pooled[name] += list(errors_of(ratios))
    print(
        f"\n== Collective loss selection: {NUM_FOLDS}-fold cross-validation on the calibration "
        "(even) rows only =="
    )
    summary: dict[str, Any] = {}
    for name in LOSSES:
        stats = error_stats(pooled[name])
        summary[name] = {"cv_median_error": stats["median"], "cv_p90_error": stats["p90"]}
        print(f"   {name:16} CV median {pct(stats['median'])}  p90 {pct(stats['p90'])}")
    chosen = min(LOSSES, key=lambda name: summary[name]["cv_median_error"])
    print(f"   chosen: {chosen!r}")
    return chosen, {"chosen": chosen, "cross_validation": summary}, oof


#: Out-of-fold measured/predicted ratios by (op, tier, smallest message, largest message).
IntervalRatios = dict[tuple[Collective, LinkKind, int, int], list[float]]


def fit_in_node(
    rows: list[CollectiveRow],
) -> tuple[dict[str, tuple[list[CollectiveFit], IntervalRatios]], dict[str, Any]]:
    """Per preset: the in-node fits and their out-of-fold ratios per op and message regime
    (below 1 MiB, from 1 MiB: the intervals); and the loss selection's report."""
    buckets = calibration_buckets(rows)
    chosen, report, oof = select_loss(buckets)
    huber = LOSSES[chosen]
    out: dict[str, tuple[list[CollectiveFit], IntervalRatios]] = {}
    for preset, per_bucket in buckets.items():
        gpu = next(g for g, p in PRESETS.items() if p == preset)
        fits: list[CollectiveFit] = []
        by_regime: IntervalRatios = defaultdict(list)
        for (op, group, pattern), members in per_bucket.items():
            params, _ = bucket_predictor(
                as_collective_rows(members), cap=nvlink_cap(preset), huber=huber
            )
            latency, pipeline, bandwidth = params
            totals = sorted({r.num_devices for r in members})
            fits.append(
                CollectiveFit(
                    op=op,
                    tier=LinkKind.NVLINK,
                    group_size=group,
                    fitted_group_sizes=(group,),
                    permute_pattern=pattern,
                    latency_s=latency,
                    latency_per_step_s=0.0,
                    pipeline_latency_s=pipeline,
                    bus_bytes_per_s=bandwidth,
                    num_calibration_rows=len(members),
                    data_source=(
                        f"{sd.COLLECTIVES_FILE} {gpu} {bucket_name(op, group, pattern)} "
                        f"(of {'/'.join(map(str, totals))} GPUs)"
                    ),
                )
            )
            ratios = oof[preset, chosen][op, group, pattern]
            for r, ratio in zip(members, ratios, strict=True):
                if r.message_bytes >= LARGE_MESSAGE_BYTES:
                    regime = (op, LinkKind.NVLINK, LARGE_MESSAGE_BYTES, 0)
                else:
                    regime = (op, LinkKind.NVLINK, 0, LARGE_MESSAGE_BYTES)
                by_regime[regime].append(float(ratio))
        out[preset] = (fits, dict(by_regime))
    return out, report


def evaluate_in_node(rows: list[CollectiveRow]) -> dict[str, Any]:
    print(
        "\n== Collectives in one NVLink domain: held-out (odd-row) time error "
        "|pred - meas| / meas =="
    )
    print(
        f"{'GPU':6} {'op':19} {'messages':9} {'rows':>5} {'calibrated median':>18} {'p90':>8}"
        f" {'roofline median':>16} {'p90':>8} {'in interval':>11}"
    )
    meshes: dict[tuple[str, int, int], DeviceMesh] = {}
    errors: dict[tuple[str, str, str], tuple[list[float], list[float], list[bool]]] = defaultdict(
        lambda: ([], [], [])
    )
    for r in rows:
        if r.split is not sd.Split.HELDOUT:
            continue
        preset = PRESETS[r.gpu]
        key = (preset, r.num_devices, r.group_size)
        if key not in meshes:
            meshes[key] = mesh_for(load_preset(preset), r.num_devices, r.group_size)
        figure = calibrated_collective(
            meshes[key],
            r.op,
            ("y",),
            elements_in_per_chip=elements_for(r.op, r.message_bytes, r.group_size),
            dtype="int8",
            permute_pattern=r.pattern or "ring_i_to_i_plus_1",
            calibration=load_calibration(preset),
        )
        if figure.calibrated_s is None or figure.low_s is None or figure.high_s is None:
            raise SystemExit(f"{r.gpu} {r.op.value} is not calibrated: {figure.source}")
        regime = ">=1MiB" if r.message_bytes >= LARGE_MESSAGE_BYTES else "<1MiB"
        calibrated_errors, roofline_errors, inside = errors[r.gpu, r.op.value, regime]
        calibrated_errors.append(rel_error(figure.calibrated_s, r.time_s))
        roofline_errors.append(rel_error(figure.roofline_s, r.time_s))
        inside.append(figure.low_s <= r.time_s <= figure.high_s)
    report: dict[str, Any] = {}
    for gpu in PRESETS:
        per_op: dict[str, Any] = {}
        for op in Collective:
            for regime in (">=1MiB", "<1MiB"):
                if (gpu, op.value, regime) not in errors:
                    continue
                cal_e, roof_e, inside = errors[gpu, op.value, regime]
                cal, rf = error_stats(cal_e), error_stats(roof_e)
                coverage = float(np.mean(inside))
                print(
                    f"{gpu:6} {op.value:19} {regime:9} {cal['rows']:5d} "
                    f"{pct(cal['median']):>18} {pct(cal['p90']):>8} {pct(rf['median']):>16} "
                    f"{pct(rf['p90']):>8} {pct(coverage):>11}"
                )
                per_op.setdefault(op.value, {})[regime] = {
                    "heldout_median_error": cal["median"],
                    "heldout_p90_error": cal["p90"],
                    "roofline_median_error": rf["median"],
                    "roofline_p90_error": rf["p90"],
                    "heldout_rows": cal["rows"],
                    "heldout_interval_coverage": coverage,
                }
        report[gpu] = per_op
    return report


# == collectives across nodes (Playbook sweep, H100) =========================================


@dataclass(frozen=True, slots=True)
class PlaybookRow:
    index: int
    split: sd.Split
    op: Collective
    nodes: int
    time_s: float
    busbw_bytes_per_s: float

    @property
    def gpus(self) -> int:
        return self.nodes * GPUS_PER_NODE


def load_playbook(data_dir: Path) -> list[PlaybookRow]:
    from sharding_roofline.calibration.model import bus_bytes

    out = []
    for row in sd.read_rows(data_dir, sd.PLAYBOOK_COLLECTIVES_FILE):
        op = PLAYBOOK_OPS[row["op"]]
        nodes = int(row["nodes"])
        busbw = float(row["bandwidth_GBps_median"]) * 1e9
        # Read as NCCL bus bandwidth (the data README: the 1-node AllReduce is above what an
        # algorithmic bandwidth could be), so time = bus bytes / busbw.
        sent = bus_bytes(op, PLAYBOOK_MESSAGE_BYTES, nodes * GPUS_PER_NODE)
        out.append(
            PlaybookRow(
                index=row.index,
                split=sd.split_of(sd.PLAYBOOK_COLLECTIVES_FILE, row),
                op=op,
                nodes=nodes,
                time_s=sent / busbw,
                busbw_bytes_per_s=busbw,
            )
        )
    return out


def cross_node_cap(hardware: HardwareSpec) -> float:
    """The bus bandwidth no cross-node fit may exceed: a GPU's share of its node's egress
    (or its NVLink bandwidth, if lower). Every group that spans nodes has a roofline bus
    bandwidth at least this, so the calibrated time never beats the roofline's bandwidth
    term."""
    nvlink = hardware.nvlink
    if nvlink is None or not hardware.scale_out:
        raise SystemExit(f"{hardware.name} has no NVLink and scale-out tables")
    egress = nvlink.gpus_per_domain * min(
        level.bytes_per_s_per_chip_per_direction for level in hardware.scale_out
    )
    return min(nvlink.bytes_per_s_per_gpu_per_direction, egress)


def fit_cross_node(rows: list[PlaybookRow]) -> tuple[list[CollectiveFit], IntervalRatios]:
    """Ring fits across nodes: AllGather and ReduceScatter share one (same algorithm, and
    the package costs them alike), AllReduce has its own."""
    hardware = load_preset("h100")
    families = (
        ((Collective.ALL_GATHER, Collective.REDUCE_SCATTER), "AllGather/ReduceScatter"),
        ((Collective.ALL_REDUCE,), "AllReduce"),
    )
    fits: list[CollectiveFit] = []
    by_op: IntervalRatios = {}
    for ops, label in families:
        ratios: list[float] = []
        members = [
            r for r in rows if r.op in ops and r.split is sd.Split.CALIBRATION and r.nodes >= 2
        ]
        table = CollectiveRows(
            ops=tuple(r.op for r in members),
            group_size=np.array([r.gpus for r in members], dtype=float),
            message_bytes=np.full(len(members), float(PLAYBOOK_MESSAGE_BYTES)),
            time_s=np.array([r.time_s for r in members]),
        )
        cap = cross_node_cap(hardware)
        per_step, bandwidth = fit_collective_ring(table, max_bus_bytes_per_s=cap).params
        # The interval: each row predicted by a fit to the others (leave one out).
        for fold in fold_masks(len(members), len(members)):
            step_i, bw_i = fit_collective_ring(table.subset(~fold), max_bus_bytes_per_s=cap).params
            held = table.subset(fold)
            predicted = collective_predict(0.0, step_i, 0.0, np.full(1, bw_i), held)
            ratios.append(float(held.time_s[0] / predicted[0]))
        sizes = tuple(sorted({r.gpus for r in members}))
        nodes = sorted({r.nodes for r in members})
        for op in ops:
            fit = CollectiveFit(
                op=op,
                tier=LinkKind.INFINIBAND,
                group_size=0,
                fitted_group_sizes=sizes,
                gpus_per_node=GPUS_PER_NODE,
                latency_s=0.0,
                latency_per_step_s=per_step,
                pipeline_latency_s=0.0,
                bus_bytes_per_s=bandwidth,
                num_calibration_rows=len(members),
                data_source=(
                    f"{sd.PLAYBOOK_COLLECTIVES_FILE} {label} on {'/'.join(map(str, nodes))} "
                    f"nodes (256 MiB)"
                ),
            )
            fits.append(fit)
            by_op[op, LinkKind.INFINIBAND, 0, 0] = ratios
    return fits, by_op


def evaluate_cross_node(rows: list[PlaybookRow]) -> dict[str, Any]:
    print(
        "\n== Collectives across nodes (Playbook sweep, H100, 256 MiB): every row not fitted on =="
    )
    print(
        f"{'op':15} {'nodes':>5} {'split':12} {'measured busbw':>14} {'calibrated':>11} "
        f"{'error':>7} {'roofline':>9} {'error':>7}  in interval"
    )
    hardware = load_preset("h100")
    calibration = load_calibration("h100")
    out_rows = []
    far_cal: list[float] = []
    far_roof: list[float] = []
    near_cal: list[float] = []
    near_roof: list[float] = []
    for r in rows:
        fitted = r.split is sd.Split.CALIBRATION and r.nodes >= 2
        if fitted:
            continue
        mesh = DeviceMesh.create(
            hardware, f"x={r.nodes},y={GPUS_PER_NODE}", f"{r.nodes}x{GPUS_PER_NODE}"
        )
        figure = calibrated_collective(
            mesh,
            r.op,
            ("x", "y"),
            elements_in_per_chip=elements_for(r.op, PLAYBOOK_MESSAGE_BYTES, r.gpus),
            dtype="int8",
            calibration=calibration,
        )
        if figure.calibrated_s is None or figure.low_s is None or figure.high_s is None:
            raise SystemExit(f"{r.op.value} on {r.nodes} nodes is not calibrated: {figure.source}")
        inside = figure.low_s <= r.time_s <= figure.high_s
        cal_err = rel_error(figure.calibrated_s, r.time_s)
        roof_err = rel_error(figure.roofline_s, r.time_s)
        from sharding_roofline.calibration.model import bus_bytes

        sent = bus_bytes(r.op, PLAYBOOK_MESSAGE_BYTES, r.gpus)
        split = "held out" if r.split is sd.Split.HELDOUT else "calib, 1 node"
        print(
            f"{r.op.book_name:15} {r.nodes:5d} {split:12} {r.busbw_bytes_per_s / 1e9:9.1f} GB/s "
            f"{sent / figure.calibrated_s / 1e9:6.1f} GB/s {pct(cal_err)} "
            f"{sent / figure.roofline_s / 1e9:4.0f} GB/s {pct(roof_err)}  {'yes' if inside else 'no'}"
        )
        out_rows.append(
            {
                "op": r.op.value,
                "nodes": r.nodes,
                "row_index": r.index,
                "split": r.split.value,
                "measured_bus_bytes_per_s": r.busbw_bytes_per_s,
                "calibrated_bus_bytes_per_s": sent / figure.calibrated_s,
                "roofline_bus_bytes_per_s": sent / figure.roofline_s,
                "calibrated_error": cal_err,
                "roofline_error": roof_err,
                "in_interval": inside,
                "tier": "nvlink" if r.nodes == 1 else "infiniband",
            }
        )
        if r.split is sd.Split.HELDOUT and r.nodes > sd.MAX_CALIBRATION_NODES:
            far_cal.append(cal_err)
            far_roof.append(roof_err)
        elif r.split is sd.Split.HELDOUT:
            near_cal.append(cal_err)
            near_roof.append(roof_err)
    summary: dict[str, Any] = {"rows": out_rows}
    if far_cal:
        cal, rf = error_stats(far_cal), error_stats(far_roof)
        summary["heldout_16_64_nodes"] = {
            "heldout_median_error": cal["median"],
            "heldout_p90_error": cal["p90"],
            "roofline_median_error": rf["median"],
            "roofline_p90_error": rf["p90"],
            "heldout_rows": cal["rows"],
        }
        print(
            f"16-64 nodes (held out, {cal['rows']} rows): calibrated median {pct(cal['median'])}"
            f" p90 {pct(cal['p90'])}; roofline median {pct(rf['median'])} p90 {pct(rf['p90'])}"
        )
    return summary


# == the whole training step (Playbook runs, H100) and torchtitan ===========================


def step_error(predicted_step_s: float, measured_step_s: float) -> float:
    """|predicted - measured| / measured of tokens/s (the same as measured/predicted step
    time minus one, in absolute value)."""
    return abs(measured_step_s / predicted_step_s - 1.0)


def fit_training_step_part(
    data_dir: Path, calibration: Calibration
) -> tuple[Calibration, dict[str, Any]]:
    """The h100 calibration with its ``step`` and ``memory`` parts fitted on the calibration
    split's Playbook runs (``calibration.training.fit_playbook``)."""
    print("\n== Training step and memory: fitted on the Playbook's 1B/8B runs on 1-8 nodes ==")
    runs = training.plan_calibration_runs(data_dir, calibration)
    result = training.fit_playbook(runs)
    report = result.report
    cv = report["loss_selection"]["cross_validation"]
    for name, stats in cv.items():
        print(
            f"   {name:14} {training.NUM_FOLDS}-fold CV tokens/s error: median "
            f"{pct(stats['cv_median_error'])}, mean {pct(stats['cv_mape'])}"
        )
    print(f"   chosen: {report['loss_selection']['chosen']!r} ({len(runs)} calibration runs)")
    for name, value in report["step_parameters"].items():
        print(f"   {name:36} {value:.6g}")
    for name, value in report["memory_parameters"].items():
        print(f"   memory {name:29} {value:.6g}")
    step, memory = result.step, result.memory
    print(
        f"   step interval (out of fold, p10-p90 of measured/predicted): "
        f"{step.interval.low_ratio:.3f}-{step.interval.high_ratio:.3f}; memory "
        f"{memory.interval.low_ratio:.3f}-{memory.interval.high_ratio:.3f}"
    )
    names = [f.name for f in calibration.source.data_files]
    names += [sd.PLAYBOOK_RUNS_FILE, sd.PLAYBOOK_MODELS_FILE]
    source = dataclasses.replace(
        calibration.source,
        data_files=data_files(data_dir, names),
        split=calibration.source.split
        + f"; the 1B and 8B runs on 1-8 nodes of {sd.PLAYBOOK_RUNS_FILE} (3B, 80B and "
        "16-64 nodes held out)",
        notes=(
            "Fitted parameters only; the measurements stay in the shared data folder. The "
            "training step and memory describe nanotron as the Playbook ran it."
        ),
    )
    stall = report["stall"]
    print(
        f"   stalls: {stall['stalled_runs']} of {len(runs)} calibration runs measured over "
        f"{stall['stall_ratio']:g}x the base step; they lose "
        f"{stall['stall_per_exchange_s']:.3f} s per slot and stage exchange (quartiles "
        f"{stall['stall_per_exchange_quartiles_s'][0]:.3f}-"
        f"{stall['stall_per_exchange_quartiles_s'][1]:.3f} s)"
    )
    for name, loss in stall["probability_selection"]["cv_log_loss_per_run"].items():
        print(f"   stall probability {name:40} {training.NUM_FOLDS}-fold CV log loss {loss:.4f}")
    zero0 = stall["hazard_per_node_pipelined_zero0"]
    print(
        f"   chosen: {stall['probability_selection']['chosen']!r}: hazard per node "
        f"{stall['hazard_per_node_pipelined']:.4f} pipelined"
        + ("" if zero0 is None else f" ({zero0:.4f} with ZeRO-0 and data parallelism)")
        + f", {stall['hazard_per_node_unpipelined']:.4f} unpipelined; memory pressure above "
        f"{stall['memory_pressure_fraction']:.0%} of capacity stalls with probability "
        f"{stall['memory_pressure_probability']:.2f}"
    )
    selection = stall["decision_selection"]
    for name, scores in selection["cross_validation"].items():
        print(
            f"   stall decision {name:16} {training.NUM_FOLDS}-fold CV tokens/s MAPE "
            f"{pct(scores['cv_mape'])}, Spearman median {scores['cv_spearman_median']:.3f}"
        )
    print(
        f"   shipped decision: {selection['chosen']!r} (by definition: the expected step; the "
        "others for comparison)"
    )
    fitted = dataclasses.replace(
        calibration, source=source, step=step, memory=memory, stall=result.stall
    )
    return fitted, report


def _group_metrics(members: list[tuple[float, float]]) -> dict[str, Any]:
    """(predicted, measured) tokens/s of one (model, nodes) group."""
    predicted = [p for p, _ in members]
    measured = [m for _, m in members]
    errors = [abs(p - m) / m for p, m in members]
    best_measured = max(measured)
    chosen = max(range(len(members)), key=lambda i: predicted[i])
    rho = spearman(predicted, measured)
    return {
        "runs": len(members),
        "mape": float(np.mean(errors)),
        "median_error": float(np.median(errors)),
        "spearman": None if math.isnan(rho) else rho,
        "best_within_10pct": measured[chosen] >= 0.9 * best_measured,
    }


def evaluate_playbook(data_dir: Path) -> dict[str, Any]:
    """Every Playbook run through ``calibrate_model_plan`` with the shipped h100 file."""
    calibration = load_calibration("h100")
    if calibration is None or calibration.step is None or calibration.memory is None:
        raise SystemExit("h100.json has no training-step calibration")
    data = training.plan_playbook(data_dir, calibration)
    capacity = calibration.memory.capacity_bytes
    print(
        "\n== Playbook runs: held-out tokens/s per GPU (3B, 80B, and 1B/8B on 16-64 nodes) and "
        "the fit / out-of-memory call =="
    )
    unmapped = [r for r in data.runs if r.plan is None]
    for reason in sorted({r.rejected for r in unmapped}):
        count = sum(r.rejected == reason for r in unmapped)
        print(f"   not mappable ({count} runs): {reason}")
    rows: dict[str, list[dict[str, Any]]] = {"calibration": [], "heldout": []}
    # the other stall decisions, for comparison only (the shipped one was chosen by
    # cross-validation on the calibration runs)
    others: dict[str, Calibration] = {}
    if calibration.stall is not None:
        for decision in StallDecision:
            if decision is not calibration.stall.decision:
                others[decision.value] = dataclasses.replace(
                    calibration, stall=dataclasses.replace(calibration.stall, decision=decision)
                )
    for planned in data.runs:
        if planned.plan is None:
            continue
        figure = calibrate_model_plan(
            planned.plan, calibration=calibration, microbatches=planned.layout.microbatches
        )
        alternatives = {
            name: calibrate_model_plan(
                planned.plan, calibration=other, microbatches=planned.layout.microbatches
            ).tokens_per_s_per_chip
            or 0.0
            for name, other in others.items()
        }
        if figure.step_s is None or figure.tokens_per_s_per_chip is None:
            raise SystemExit(f"run {planned.run.run_id}: {figure.source}")
        run = planned.run
        measured = run.tokens_per_s_per_gpu or 0.0
        measured_step = run.measured_step_s or 0.0
        low, high = figure.tokens_per_s_interval or (0.0, 0.0)
        slots = planned.features.slots if planned.features else 1
        rows[planned.split.value].append(
            {
                "run_id": run.run_id,
                "row_index": run.index,
                "model": run.model,
                "nodes": run.nodes,
                "config": planned.layout.strategy
                + f",mbs={run.micro_batch_size},ga={run.grad_accum_steps}",
                "measured_tps": measured,
                "predicted_tps": figure.tokens_per_s_per_chip,
                "roofline_tps": figure.roofline_tokens_per_s_per_chip,
                "error": abs(figure.tokens_per_s_per_chip - measured) / measured,
                "other_decisions_tps": alternatives,
                "stall_probability": figure.stall_probability,
                "stall_included": figure.stall_included,
                "roofline_error": abs(figure.roofline_tokens_per_s_per_chip - measured) / measured,
                "in_interval": low <= measured <= high,
                "excess_per_slot_s": (measured_step - figure.step_s) / slots,
                "measured_memory": run.memory_bytes,
                "predicted_memory": figure.memory_per_chip_bytes,
                "fits": figure.fits,
                "status": run.status,
            }
        )
    out: dict[str, Any] = {
        "unmapped_runs": {
            "count": len(unmapped),
            "reasons": sorted({r.rejected for r in unmapped}),
            "run_ids": [r.run.run_id for r in unmapped],
        }
    }
    for side, members in rows.items():
        errors = np.array([r["error"] for r in members])
        roof = np.array([r["roofline_error"] for r in members])
        inside = np.mean([r["in_interval"] for r in members])
        print(
            f"   {side:11} {len(members):5d} runs: tokens/s MAPE {pct(float(errors.mean()))}, "
            f"median {pct(float(np.median(errors)))}, p90 {pct(float(np.percentile(errors, 90)))}, "
            f"within 15% {pct(float(np.mean(errors <= 0.15)))}; roofline MAPE "
            f"{pct(float(roof.mean()))}, median {pct(float(np.median(roof)))}; in interval {pct(float(inside))}"
        )
        out[f"{side}_runs"] = len(members)
        out[f"{side}_mape"] = float(errors.mean())
        out[f"{side}_median_error"] = float(np.median(errors))
        out[f"{side}_p90_error"] = float(np.percentile(errors, 90))
        out[f"{side}_within_15pct_share"] = float(np.mean(errors <= 0.15))
        out[f"{side}_roofline_mape"] = float(roof.mean())
        out[f"{side}_roofline_median_error"] = float(np.median(roof))
        out[f"{side}_interval_coverage"] = float(inside)
        out[f"{side}_other_decisions"] = {}
        for name in others:
            pairs = [(r["other_decisions_tps"][name], r["measured_tps"]) for r in members]
            alt = np.array([abs(p - m) / m for p, m in pairs])
            by_group: dict[tuple[str, int], list[tuple[float, float]]] = defaultdict(list)
            for r, pair in zip(members, pairs, strict=True):
                by_group[r["model"], r["nodes"]].append(pair)
            rhos = [
                g["spearman"]
                for g in (_group_metrics(v) for v in by_group.values() if len(v) >= 3)
                if g["spearman"] is not None
            ]
            print(
                f"   {'':11} with the stall decision {name!r} (not shipped): MAPE "
                f"{pct(float(alt.mean()))}, median {pct(float(np.median(alt)))}, Spearman "
                f"median {float(np.median(rhos)):.3f}"
            )
            out[f"{side}_other_decisions"][name] = {
                "mape": float(alt.mean()),
                "median_error": float(np.median(alt)),
                "spearman_median": float(np.median(rhos)),
            }
    held = rows["heldout"]
    # The stall: a run measured at least 2x slower than predicted, by 0.3-2 s per
    # microbatch slot (the ~1 s per slot the data show); not used in any fit.
    stalled = [r for r in held if r["measured_tps"] * 2 <= r["predicted_tps"]]
    stall_like = [r for r in stalled if 0.3 <= r["excess_per_slot_s"] <= 2.0]
    rest = [r for r in held if r["measured_tps"] * 2 > r["predicted_tps"]]
    rest_errors = np.array([r["error"] for r in rest])
    print(
        f"   held-out runs measured >= 2x slower than predicted: {len(stalled)} "
        f"({pct(len(stalled) / len(held))}), {len(stall_like)} of them by 0.3-2 s per microbatch "
        f"slot; the other {len(rest)}: MAPE {pct(float(rest_errors.mean()))}, median "
        f"{pct(float(np.median(rest_errors)))}"
    )
    out["heldout_slower_2x"] = {
        "runs": len(stalled),
        "share": len(stalled) / len(held),
        "by_0p3_to_2s_per_slot": len(stall_like),
        "others_mape": float(rest_errors.mean()),
        "others_median_error": float(np.median(rest_errors)),
        "others_runs": len(rest),
    }
    # per (model, nodes) group
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in held:
        groups[r["model"], r["nodes"]].append(r)
    per_group: dict[str, Any] = {}
    print(
        f"\n   {'group':12} {'runs':>5} {'MAPE':>8} {'median':>8} {'Spearman':>9}  best within 10%"
    )
    for (model, nodes), members in sorted(
        groups.items(), key=lambda item: (item[0][0], item[0][1])
    ):
        metrics = _group_metrics([(r["predicted_tps"], r["measured_tps"]) for r in members])
        per_group[f"{model}/{nodes}"] = metrics
        rho = metrics["spearman"]
        print(
            f"   {model + ' x' + str(nodes):12} {metrics['runs']:5d} {pct(metrics['mape']):>8} "
            f"{pct(metrics['median_error']):>8} {'-' if rho is None else f'{rho:9.3f}':>9}  "
            f"{'yes' if metrics['best_within_10pct'] else 'no'}"
        )
    rhos = [
        g["spearman"] for g in per_group.values() if g["spearman"] is not None and g["runs"] >= 3
    ]
    best = [g["best_within_10pct"] for g in per_group.values()]
    # the fit / out-of-memory call
    fit_right = [r["fits"] for r in held]
    fit_right_cal = [r["fits"] for r in rows["calibration"]]
    failed = [f for f in data.failed if f.plan is not None]
    failed_unmapped = [f for f in data.failed if f.plan is None]
    labelled = [f for f in failed if f.run.status == "crashed_or_oom"]
    twins = [f for f in labelled if f.run.n_measured_same_config > 0]
    oom_rows = [f for f in labelled if f.run.n_measured_same_config == 0]
    oom_calls = []
    predicted_gb = []
    for f in oom_rows:
        if f.plan is None:  # pragma: no cover - oom_rows are the planned ones
            continue
        figure = calibrate_model_plan(
            f.plan, calibration=calibration, microbatches=f.layout.microbatches
        )
        oom_calls.append(figure.fits is False)
        predicted_gb.append((figure.memory_per_chip_bytes or 0.0) / capacity)
    correct = sum(fit_right) + sum(oom_calls)
    total = len(fit_right) + len(oom_calls)
    accuracy = correct / total
    far = sum(1 for x in predicted_gb if x < 0.5)
    mem_errors = np.array(
        [abs(r["predicted_memory"] - r["measured_memory"]) / r["measured_memory"] for r in held]
    )
    print(
        f"\n   memory (held out): MAPE {pct(float(mem_errors.mean()))}, median {pct(float(np.median(mem_errors)))}"
    )
    print(
        f"   fit / OOM call at {capacity / 1e9:.0f} GB: {correct}/{total} = {pct(accuracy)} right "
        f"(held-out measured runs called fitting: {pct(float(np.mean(fit_right)))} of "
        f"{len(fit_right)}; failed runs called out of memory: {pct(float(np.mean(oom_calls)))} of "
        f"{len(oom_calls)}, of which {far} are predicted under half the limit; calibration runs "
        f"called fitting: {pct(float(np.mean(fit_right_cal)))})"
    )
    print(
        f"   left out of the call: {len(twins)} failed rows whose configuration also has a "
        f"measured run, {len(failed_unmapped)} failed rows the planner cannot map"
    )
    out.update(
        {
            "heldout_mape": out["heldout_mape"],
            "spearman_median": float(np.median(rhos)),
            "spearman_groups": len(rhos),
            "best_within_10pct_share": float(np.mean(best)),
            "memory_call_accuracy": accuracy,
            "memory_call": {
                "capacity_bytes": capacity,
                "heldout_measured_called_fit": float(np.mean(fit_right)),
                "heldout_measured_runs": len(fit_right),
                "failed_called_oom": float(np.mean(oom_calls)),
                "failed_runs": len(oom_calls),
                "failed_predicted_under_half_capacity": far,
                "failed_with_measured_twin_left_out": len(twins),
                "failed_unmappable_left_out": len(failed_unmapped),
                "calibration_measured_called_fit": float(np.mean(fit_right_cal)),
            },
            "heldout_memory_mape": float(mem_errors.mean()),
            "heldout_memory_median_error": float(np.median(mem_errors)),
            "groups": per_group,
        }
    )
    print(
        f"\n   headline: held-out MAPE {pct(out['heldout_mape'])} (goal <= 15%), Spearman median "
        f"{out['spearman_median']:.3f} over {len(rhos)} groups (goal >= 0.8), best within 10% in "
        f"{pct(out['best_within_10pct_share'])} of {len(best)} groups, memory call {pct(accuracy)} "
        "(goal >= 95%)"
    )
    return out


def evaluate_torchtitan(data_dir: Path) -> dict[str, Any]:
    """Every torchtitan row, predicted with the shipped h100 file (never fitted)."""
    print("\n== torchtitan H100 (never fitted): predicted tokens/s per GPU and memory ==")
    calibration = load_calibration("h100")
    planner = RunPlanner(load_preset("h100"), {})
    out_rows = []
    tps_errors: list[float] = []
    mem_errors: list[float] = []
    print(
        f"   {'row':52} {'measured':>9} {'calibrated':>10} {'roofline':>9} {'error':>7} {'mem meas':>9} {'mem pred':>9}  not modelled"
    )
    for row in sd.read_rows(data_dir, sd.TORCHTITAN_FILE):
        run = TorchtitanRun.from_row(row)
        layout = run.layout()
        plan = planner.plan(layout)
        if isinstance(plan, Rejected):
            print(f"   {run.label[:52]:52} not mappable: {plan.reason}")
            out_rows.append({"row_index": run.index, "label": run.label, "unmapped": plan.reason})
            continue
        figure = calibrate_model_plan(plan, calibration=calibration)
        if figure.tokens_per_s_per_chip is None or figure.memory_per_chip_bytes is None:
            raise SystemExit(f"torchtitan row {run.index}: {figure.source}")
        error = (
            abs(figure.tokens_per_s_per_chip - run.tokens_per_s_per_gpu) / run.tokens_per_s_per_gpu
        )
        tps_errors.append(error)
        mem_error = None
        if run.memory_bytes:
            mem_error = abs(figure.memory_per_chip_bytes - run.memory_bytes) / run.memory_bytes
            mem_errors.append(mem_error)
        print(
            f"   {run.label[:52]:52} {run.tokens_per_s_per_gpu:9,.0f} {figure.tokens_per_s_per_chip:10,.0f} "
            f"{figure.roofline_tokens_per_s_per_chip:9,.0f} {pct(error)} "
            f"{(run.memory_bytes or 0) / 2**30:8.1f}G {figure.memory_per_chip_bytes / 2**30:8.1f}G  "
            f"{', '.join(run.not_modelled) or '-'}"
        )
        out_rows.append(
            {
                "row_index": run.index,
                "label": run.label,
                "model": run.model,
                "strategy": layout.strategy,
                "mesh": layout.mesh_spec,
                "measured_tps": run.tokens_per_s_per_gpu,
                "predicted_tps": figure.tokens_per_s_per_chip,
                "roofline_tps": figure.roofline_tokens_per_s_per_chip,
                "error": error,
                "measured_memory_bytes": run.memory_bytes,
                "predicted_memory_bytes": figure.memory_per_chip_bytes,
                "memory_error": mem_error,
                "not_modelled": list(run.not_modelled),
            }
        )
    result = {
        "mape_tps": float(np.mean(tps_errors)),
        "median_error_tps": float(np.median(tps_errors)),
        "rows_tps": len(tps_errors),
        "mape_memory": float(np.mean(mem_errors)),
        "median_error_memory": float(np.median(mem_errors)),
        "rows_memory": len(mem_errors),
        "memory_units": "measured GiB x 2^30 against the calibrated bytes",
        "rows": out_rows,
    }
    print(
        f"   tokens/s MAPE {pct(result['mape_tps'])} (median {pct(result['median_error_tps'])}) over "
        f"{len(tps_errors)} rows; memory MAPE {pct(result['mape_memory'])} (median "
        f"{pct(result['median_error_memory'])}) over {len(mem_errors)} rows"
    )
    return result


# == files ====================================================================================


def data_files(data_dir: Path, names: Iterable[str]) -> tuple[DataFile, ...]:
    return tuple(DataFile(name=n, sha256=sd.file_sha256(data_dir, n)) for n in names)


def interval_of(ratios: Sequence[float]) -> RatioInterval:
    low, high = ratio_quantiles(ratios)
    return RatioInterval(low_ratio=low, high_ratio=high, num_points=len(ratios))


def build_calibrations(
    data_dir: Path,
    matmul: dict[str, tuple[MatmulFit, ...]],
    in_node: dict[str, tuple[list[CollectiveFit], IntervalRatios]],
    cross: tuple[list[CollectiveFit], IntervalRatios],
) -> list[Calibration]:
    today = dt.date.today().isoformat()
    out = []
    for preset in PRESETS.values():
        fits, ratios = in_node[preset]
        collectives = list(fits)
        if preset == "h100":
            collectives += cross[0]
            ratios = {**ratios, **cross[1]}
        intervals = [
            CollectiveInterval(
                op=op,
                tier=tier,
                min_message_bytes=low,
                max_message_bytes=high,
                interval=interval_of(values),
            )
            for (op, tier, low, high), values in sorted(
                ratios.items(), key=lambda item: (item[0][0].value, item[0][1].value, item[0][2])
            )
        ]
        names = [sd.COLLECTIVES_FILE]
        if preset in matmul:
            names.insert(0, next(f for g, f in sd.MATMUL_FILES.items() if PRESETS[g] == preset))
        split = (
            "calibration split only: rows with an even 0-based index (header excluded) of "
            + ", ".join(names)
        )
        if preset == "h100":
            names.append(sd.PLAYBOOK_COLLECTIVES_FILE)
            split += f"; the 2-8 node rows of {sd.PLAYBOOK_COLLECTIVES_FILE} (16-64 held out)"
        out.append(
            Calibration(
                preset=preset,
                description=DESCRIPTIONS[preset],
                source=CalibrationSource(
                    data_files=data_files(data_dir, names),
                    data_readme="shared/data/README.md (columns, units, caveats)",
                    split=split,
                    command=COMMAND,
                    fitted_on=today,
                    notes=(
                        "Fitted parameters only; the measurements stay in the shared data "
                        "folder. No training-step or memory fit: the Playbook runs are H100 only."
                    ),
                ),
                matmul=matmul.get(preset, ()),
                collectives=tuple(collectives),
                collective_intervals=tuple(intervals),
            )
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true", help="fit and report, but write no file")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or sd.find_data_dir(REPO)
    if data_dir is None or not (data_dir / sd.COLLECTIVES_FILE).is_file():
        print(
            f"no shared data folder (looked at ${sd.DATA_DIR_ENV} and {REPO.parent}/shared/data);"
            " pass --data-dir",
            file=sys.stderr,
        )
        return 2
    counts = sd.split_counts(data_dir)
    print(f"data: {data_dir}")
    print("split (rows per file):")
    for name, per in counts.items():
        print(f"  {name:34} " + ", ".join(f"{k} {v}" for k, v in per.items()))

    matmul, evaluate_matmul = run_matmul(data_dir)
    collective_rows = load_collectives(data_dir)
    in_node, loss_selection = fit_in_node(collective_rows)
    playbook = load_playbook(data_dir)
    cross = fit_cross_node(playbook)
    calibrations = build_calibrations(data_dir, matmul, in_node, cross)
    step_report: dict[str, Any] = {}
    for i, calibration in enumerate(calibrations):
        if calibration.preset == "h100":
            calibrations[i], step_report = fit_training_step_part(data_dir, calibration)
    if args.no_write:
        print("\n(--no-write: evaluating the shipped files, not the fit just made)")
    else:
        for calibration in calibrations:
            write_calibration(calibration, PACKAGE_DIR / f"{calibration.preset}.json")
        from sharding_roofline.calibration.files import _load_shipped

        _load_shipped.cache_clear()  # read back what was just written

    results: dict[str, Any] = {
        "commit": git_commit(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": COMMAND,
        "data_dir_files": {f.name: f.sha256 for f in data_files(data_dir, sd.DATA_FILES)},
        "split": {
            "definition": "row index = 0-based position of a data row in its file, header "
            "excluded; XLA perf-table rows (matmul and collectives) with an even index are "
            "fitted on; Playbook collectives: 1-8 nodes fitted, 16-64 held out; Playbook runs: "
            "1B/8B on 1-8 nodes fitted; everything else held out",
            "rows": counts,
        },
        "errors_are": "fractions |predicted - measured| / measured of held-out rows",
    }
    matmul_report = evaluate_matmul()
    results["matmul"] = matmul_report["per_gpu"]
    results["matmul_model_selection"] = matmul_report["model_selection"]
    results["collective_loss_selection"] = loss_selection
    results["collectives"] = evaluate_in_node(collective_rows)
    results["collectives_cross_node"] = evaluate_cross_node(playbook)
    results["training_step_fit"] = step_report
    results["playbook"] = evaluate_playbook(data_dir)
    results["torchtitan"] = evaluate_torchtitan(data_dir)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(
        f"\nwrote {RESULTS.relative_to(REPO)}"
        + ("" if args.no_write else f" and {', '.join(c.preset + '.json' for c in calibrations)}")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
