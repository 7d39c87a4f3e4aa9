"""Least squares on log time, with numpy only (no scipy).

Every fit minimises ``sum((log predicted - log measured)²)`` over the calibration rows: a
relative error, so a 5 us kernel and a 5 ms one weigh the same. Parameters are positive
physical quantities, so they are fitted as logarithms, each inside a box
(``log_low <= theta <= log_high``: an efficiency at most 1, a bandwidth at most the
datasheet's). The solver is Levenberg-Marquardt with a finite-difference Jacobian and
projection onto the box, restarted from a few starting points; the best result wins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..collectives import Collective
from .model import bus_bytes, ring_steps

FloatArray = NDArray[np.float64]
#: ``theta -> residuals`` (log predicted - log measured), one per row.
Residuals = Callable[[FloatArray], FloatArray]


@dataclass(frozen=True, slots=True, kw_only=True)
class FitResult:
    """Fitted parameters (in linear units, in the order they were given) and the fit's
    measured/predicted ratios on the rows it was fitted on."""

    params: tuple[float, ...]
    ratios: tuple[float, ...]
    rms_log_error: float


def least_squares_log(
    residuals: Residuals,
    starts: Sequence[Sequence[float]],
    *,
    log_low: Sequence[float],
    log_high: Sequence[float],
    max_iterations: int = 300,
    huber_scale: float | None = None,
) -> FloatArray:
    """The ``theta`` (log parameters) that minimises ``sum(residuals(theta)²)`` in the box,
    best of the given starting points. With ``huber_scale`` the loss is Huber's instead:
    quadratic for ``|r| <= huber_scale``, linear beyond, so a few outlying rows (a first
    call 4x slower than its neighbours) cannot set a parameter alone."""
    low = np.asarray(log_low, dtype=float)
    high = np.asarray(log_high, dtype=float)
    best: FloatArray | None = None
    best_cost = np.inf
    for start in starts:
        theta = np.clip(np.asarray(start, dtype=float), low, high)
        theta, cost = _levenberg_marquardt(
            residuals,
            theta,
            low=low,
            high=high,
            max_iterations=max_iterations,
            huber_scale=huber_scale,
        )
        if cost < best_cost:
            best, best_cost = theta, cost
    if best is None:
        raise ValueError("least_squares_log needs at least one starting point")
    return best


def _levenberg_marquardt(
    residuals: Residuals,
    theta: FloatArray,
    *,
    low: FloatArray,
    high: FloatArray,
    max_iterations: int,
    huber_scale: float | None,
) -> tuple[FloatArray, float]:
    def loss(res: FloatArray) -> float:
        if huber_scale is None:
            return float(res @ res)
        size = np.abs(res)
        quadratic = np.minimum(size, huber_scale)
        return float(np.sum(quadratic * (2 * size - quadratic)))  # 2·Huber loss

    def weights(res: FloatArray) -> FloatArray:
        if huber_scale is None:
            return np.ones_like(res)
        size = np.abs(res)
        out: FloatArray = np.where(size <= huber_scale, 1.0, huber_scale / np.maximum(size, 1e-300))
        return out

    r = residuals(theta)
    cost = loss(r)
    damping = 1e-3
    step_size = 1e-6
    moved = 0.0
    for _ in range(max_iterations):
        jacobian = np.empty((r.size, theta.size))
        for j in range(theta.size):
            shifted = theta.copy()
            shifted[j] += step_size
            jacobian[:, j] = (residuals(shifted) - r) / step_size
        w = weights(r)  # iteratively reweighted least squares for the Huber loss
        normal = jacobian.T @ (w[:, None] * jacobian)
        gradient = jacobian.T @ (w * r)
        improved = False
        while damping < 1e10:
            scaled = normal + damping * (np.diag(np.diag(normal)) + 1e-12 * np.eye(theta.size))
            proposal = np.clip(theta - np.linalg.solve(scaled, gradient), low, high)
            r_new = residuals(proposal)
            cost_new = loss(r_new)
            if cost_new < cost:
                moved = float(np.max(np.abs(proposal - theta)))
                theta, r, cost = proposal, r_new, cost_new
                damping = max(damping / 3, 1e-12)
                improved = True
                break
            damping *= 4
        if not improved or moved < 1e-10:
            break
    return theta, cost


def ratio_quantiles(
    ratios: Sequence[float] | FloatArray, low: float = 10, high: float = 90
) -> tuple[float, float]:
    """The ``low``-th and ``high``-th percentiles (numpy's linear rule) of ``ratios``."""
    values = np.asarray(ratios, dtype=float)
    return float(np.percentile(values, low)), float(np.percentile(values, high))


# -- matmul ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MatmulRows:
    """Calibration rows of one (GPU, dtype key): shapes, operand bytes and measured time."""

    batch: FloatArray
    m: FloatArray
    n: FloatArray
    k: FloatArray
    hbm_bytes: FloatArray
    time_s: FloatArray

    def subset(self, keep: NDArray[np.bool_]) -> MatmulRows:
        """The rows where ``keep`` is true (for cross-validation)."""
        return MatmulRows(
            batch=self.batch[keep],
            m=self.m[keep],
            n=self.n[keep],
            k=self.k[keep],
            hbm_bytes=self.hbm_bytes[keep],
            time_s=self.time_s[keep],
        )


def matmul_predict(
    params: Sequence[float],
    rows: MatmulRows,
    *,
    peak_flops_per_s: float,
    hbm_bytes_per_s: float,
    tile: tuple[int, int, int],
) -> FloatArray:
    """``model.matmul_time_s`` vectorised over rows; ``params`` = (launch_floor_s,
    compute_efficiency, hbm_efficiency, k_overhead_elements)."""
    floor_s, compute_eff, hbm_eff, k_overhead = params
    tm, tn, tk = tile
    m_t = np.ceil(rows.m / tm) * tm
    n_t = np.ceil(rows.n / tn) * tn
    k_t = np.ceil(rows.k / tk) * tk
    compute_s = 2 * rows.batch * m_t * n_t * (k_t + k_overhead) / (compute_eff * peak_flops_per_s)
    hbm_s = rows.hbm_bytes / (hbm_eff * hbm_bytes_per_s)
    result: FloatArray = floor_s + np.maximum(compute_s, hbm_s)
    return result


def fit_matmul(
    rows: MatmulRows,
    *,
    peak_flops_per_s: float,
    hbm_bytes_per_s: float,
    tile: tuple[int, int, int],
    max_efficiency: float = 1.0,
    fit_k_overhead: bool = True,
) -> FitResult:
    """Fit (launch_floor_s, compute_efficiency, hbm_efficiency, k_overhead_elements).

    Bounds: the floor within 0.1 us-1 ms, efficiencies within 1 %-``max_efficiency`` (1: the
    datasheet is a bound), the k overhead within 0-65536 elements (fitted as log(1+x)), or
    held at 0 when ``fit_k_overhead`` is false.
    """

    def params_of(theta: FloatArray) -> tuple[float, float, float, float]:
        floor_s, compute_eff, hbm_eff, k_plus_one = np.exp(theta)
        return float(floor_s), float(compute_eff), float(hbm_eff), float(k_plus_one - 1.0)

    def residuals(theta: FloatArray) -> FloatArray:
        predicted = matmul_predict(
            params_of(theta),
            rows,
            peak_flops_per_s=peak_flops_per_s,
            hbm_bytes_per_s=hbm_bytes_per_s,
            tile=tile,
        )
        out: FloatArray = np.log(predicted) - np.log(rows.time_s)
        return out

    top = np.log(max_efficiency)
    low = [np.log(1e-7), np.log(0.01), np.log(0.01), 0.0]
    high = [np.log(1e-3), top, top, np.log(65537.0) if fit_k_overhead else 0.0]
    floor_guess = float(np.min(rows.time_s))
    starts = [
        [np.log(floor_guess), np.log(0.7), np.log(0.7), np.log(129.0)],
        [np.log(floor_guess / 2), np.log(0.9), np.log(0.9), np.log(17.0)],
        [np.log(floor_guess), np.log(0.4), np.log(0.4), np.log(1025.0)],
    ]
    theta = least_squares_log(residuals, starts, log_low=low, log_high=high)
    params = params_of(theta)
    predicted = matmul_predict(
        params, rows, peak_flops_per_s=peak_flops_per_s, hbm_bytes_per_s=hbm_bytes_per_s, tile=tile
    )
    log_error = np.log(predicted) - np.log(rows.time_s)
    return FitResult(
        params=params,
        ratios=tuple(float(x) for x in rows.time_s / predicted),
        rms_log_error=float(np.sqrt(np.mean(log_error**2))),
    )


# -- collectives -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveRows:
    """Calibration rows of collectives: op, group size, message bytes, measured time."""

    ops: tuple[Collective, ...]
    group_size: FloatArray
    message_bytes: FloatArray
    time_s: FloatArray

    def subset(self, keep: NDArray[np.bool_]) -> CollectiveRows:
        """The rows where ``keep`` is true (for cross-validation)."""
        return CollectiveRows(
            ops=tuple(op for op, kept in zip(self.ops, keep, strict=True) if kept),
            group_size=self.group_size[keep],
            message_bytes=self.message_bytes[keep],
            time_s=self.time_s[keep],
        )


def fold_masks(num_rows: int, num_folds: int) -> list[NDArray[np.bool_]]:
    """Deterministic folds for cross-validation: row ``i`` is in fold ``i % num_folds``
    (each mask marks one fold's rows). With fewer rows than folds, one row per fold."""
    folds = min(num_folds, num_rows)
    positions = np.arange(num_rows)
    return [positions % folds == f for f in range(folds)]


def collective_predict(
    latency_s: float,
    latency_per_step_s: float,
    pipeline_latency_s: float,
    bus_bytes_per_s: Sequence[float] | FloatArray,
    rows: CollectiveRows,
) -> FloatArray:
    """``model.collective_time_s`` vectorised over rows (one bandwidth per row)."""
    sent = np.array(
        [
            bus_bytes(op, v, int(n))
            for op, v, n in zip(rows.ops, rows.message_bytes, rows.group_size, strict=True)
        ]
    )
    steps = np.array(
        [ring_steps(op, int(n)) for op, n in zip(rows.ops, rows.group_size, strict=True)]
    )
    bandwidth = np.asarray(bus_bytes_per_s, dtype=float)
    pipelined = (np.sqrt(pipeline_latency_s) + np.sqrt(sent / bandwidth)) ** 2
    result: FloatArray = latency_s + steps * latency_per_step_s + pipelined
    return result


def fit_collective_bucket(
    rows: CollectiveRows, *, max_bus_bytes_per_s: float, huber_scale: float | None = None
) -> FitResult:
    """Fit (latency_s, pipeline_latency_s, bus_bytes_per_s) to one op at one group size.

    Bounds: latency 10 ns-10 ms, pipeline latency 0.1 ns-10 ms, bandwidth 100 MB/s up to
    ``max_bus_bytes_per_s`` (the preset's link bandwidth: the datasheet is a bound).
    """

    def residuals(theta: FloatArray) -> FloatArray:
        latency, pipeline, bandwidth = np.exp(theta)
        predicted = collective_predict(
            latency, 0.0, pipeline, np.full(rows.time_s.size, bandwidth), rows
        )
        out: FloatArray = np.log(predicted) - np.log(rows.time_s)
        return out

    floor_guess = float(np.min(rows.time_s))
    top = np.log(max_bus_bytes_per_s)
    low = [np.log(1e-8), np.log(1e-10), np.log(1e8)]
    high = [np.log(1e-2), np.log(1e-2), top]
    starts = [
        [np.log(floor_guess * 0.8), np.log(floor_guess * 0.05), top + np.log(0.7)],
        [np.log(floor_guess * 0.5), np.log(floor_guess * 0.5), top + np.log(0.4)],
        [np.log(floor_guess), np.log(1e-9), top + np.log(0.9)],
    ]
    theta = least_squares_log(
        residuals, starts, log_low=low, log_high=high, huber_scale=huber_scale
    )
    latency, pipeline, bandwidth = (float(x) for x in np.exp(theta))
    predicted = collective_predict(
        latency, 0.0, pipeline, np.full(rows.time_s.size, bandwidth), rows
    )
    log_error = np.log(predicted) - np.log(rows.time_s)
    return FitResult(
        params=(latency, pipeline, bandwidth),
        ratios=tuple(float(x) for x in rows.time_s / predicted),
        rms_log_error=float(np.sqrt(np.mean(log_error**2))),
    )


def fit_collective_ring(rows: CollectiveRows, *, max_bus_bytes_per_s: float) -> FitResult:
    """Fit a latency per ring step and a bus bandwidth to rows that span group sizes:
    ``time = steps·latency_per_step_s + S/B`` (``model.collective_time_s`` with no fixed or
    pipeline latency: rows of one message size cannot tell those apart). Returns
    (latency_per_step_s, bus_bytes_per_s)."""

    def predict(theta: FloatArray, table: CollectiveRows) -> FloatArray:
        per_step, bandwidth = np.exp(theta)
        return collective_predict(
            0.0, float(per_step), 0.0, np.full(table.time_s.size, bandwidth), table
        )

    def residuals(theta: FloatArray) -> FloatArray:
        out: FloatArray = np.log(predict(theta, rows)) - np.log(rows.time_s)
        return out

    top = np.log(max_bus_bytes_per_s)
    starts = [
        [np.log(1e-5), top + np.log(0.5)],
        [np.log(1e-6), top + np.log(0.2)],
        [np.log(1e-4), top + np.log(0.9)],
    ]
    theta = least_squares_log(
        residuals, starts, log_low=[np.log(1e-8), np.log(1e8)], log_high=[np.log(1e-2), top]
    )
    predicted = predict(theta, rows)
    log_error = np.log(predicted) - np.log(rows.time_s)
    return FitResult(
        params=tuple(float(x) for x in np.exp(theta)),
        ratios=tuple(float(x) for x in rows.time_s / predicted),
        rms_log_error=float(np.sqrt(np.mean(log_error**2))),
    )


# -- the training step -----------------------------------------------------------------------

#: ``TrainingStepFit``'s fitted parameters, in the order ``training_step_predict`` takes.
STEP_PARAMETERS = (
    "hidden_fraction",
    "gradient_hidden_fraction",
    "host_floor_per_layer_s",
    "pipeline_tp_floor_per_layer_step_s",
    "pipeline_send_s",
    "fixed_step_s",
    "vector_time_factor",
)
#: Their boxes (linear units); a fitted value below ``STEP_ZERO`` (at the lower bound of
#: 1e-9) is reported as 0.
STEP_ZERO = 1e-8
STEP_BOUNDS = (
    (1e-9, 1.0),
    (1e-9, 1.0),
    (1e-9, 1.0),
    (1e-9, 1.0),
    (1e-9, 10.0),
    (1e-9, 100.0),
    (1.0, 10.0),
)


@dataclass(frozen=True, slots=True, kw_only=True)
class StepRows:
    """``step.StepFeatures`` of many runs as arrays, with their measured step times."""

    matmul_s: FloatArray
    vector_s: FloatArray
    comm_s: FloatArray
    layers: FloatArray
    tp_ring_steps: FloatArray
    gradient_s: FloatArray
    optimizer_s: FloatArray
    stages: FloatArray
    microbatches: FloatArray
    time_s: FloatArray

    def subset(self, keep: NDArray[np.bool_]) -> StepRows:
        """The rows where ``keep`` is true (for cross-validation)."""
        return StepRows(
            matmul_s=self.matmul_s[keep],
            vector_s=self.vector_s[keep],
            comm_s=self.comm_s[keep],
            layers=self.layers[keep],
            tp_ring_steps=self.tp_ring_steps[keep],
            gradient_s=self.gradient_s[keep],
            optimizer_s=self.optimizer_s[keep],
            stages=self.stages[keep],
            microbatches=self.microbatches[keep],
            time_s=self.time_s[keep],
        )


def training_step_predict(params: Sequence[float] | FloatArray, rows: StepRows) -> FloatArray:
    """``step.step_time_s`` vectorised over rows; ``params`` in ``STEP_PARAMETERS`` order."""
    hidden, grad_hidden, host, pp_tp, send, fixed, vector = params
    pipelined = rows.stages > 1
    device = rows.matmul_s + vector * rows.vector_s
    comm = rows.comm_s
    exposed = device + comm - hidden * np.minimum(device, comm)
    per_layer = host + np.where(pipelined, pp_tp * rows.tp_ring_steps, 0.0)
    slot = np.maximum(exposed, rows.layers * per_layer) + np.where(pipelined, send, 0.0)
    slots = rows.microbatches + rows.stages - 1
    result: FloatArray = (
        slots * slot + (1.0 - grad_hidden) * rows.gradient_s + rows.optimizer_s + fixed
    )
    return result


def fit_training_step(rows: StepRows, *, huber_scale: float | None = None) -> FitResult:
    """Fit ``STEP_PARAMETERS`` to measured step times (log-time residuals, each parameter
    in its ``STEP_BOUNDS`` box); parameters that end below ``STEP_ZERO`` (on a lower bound
    of 1e-9) come back as 0."""

    def residuals(theta: FloatArray) -> FloatArray:
        out: FloatArray = np.log(training_step_predict(np.exp(theta), rows)) - np.log(rows.time_s)
        return out

    low = [float(np.log(a)) for a, _ in STEP_BOUNDS]
    high = [float(np.log(b)) for _, b in STEP_BOUNDS]
    starts = [
        [float(np.log(x)) for x in (0.3, 0.3, 4e-3, 3e-3, 3e-3, 0.05, 1.3)],
        [float(np.log(x)) for x in (0.05, 0.05, 1e-3, 1e-3, 1e-3, 0.01, 1.0)],
        [float(np.log(x)) for x in (0.7, 0.7, 1e-2, 1e-2, 1e-2, 0.2, 2.0)],
    ]
    theta = least_squares_log(
        residuals, starts, log_low=low, log_high=high, huber_scale=huber_scale
    )
    values = [float(x) for x in np.exp(theta)]
    params = tuple(
        0.0 if low_bound < STEP_ZERO and value < STEP_ZERO else value
        for value, (low_bound, _) in zip(values, STEP_BOUNDS, strict=True)
    )
    predicted = training_step_predict(params, rows)
    log_error = np.log(predicted) - np.log(rows.time_s)
    return FitResult(
        params=params,
        ratios=tuple(float(x) for x in rows.time_s / predicted),
        rms_log_error=float(np.sqrt(np.mean(log_error**2))),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRows:
    """Memory terms of many runs (``step.StepFeatures``, with the accumulation buffer
    already in ``persistent_bytes``) and their measured memory."""

    persistent_bytes: FloatArray
    moving_bytes: FloatArray  # activations + transient
    measured_bytes: FloatArray

    def subset(self, keep: NDArray[np.bool_]) -> MemoryRows:
        return MemoryRows(
            persistent_bytes=self.persistent_bytes[keep],
            moving_bytes=self.moving_bytes[keep],
            measured_bytes=self.measured_bytes[keep],
        )


def memory_predict(params: Sequence[float] | FloatArray, rows: MemoryRows) -> FloatArray:
    """``step.memory_bytes`` vectorised: (persistent_factor, activation_factor,
    workspace_bytes)."""
    persistent, activation, workspace = params
    result: FloatArray = persistent * rows.persistent_bytes + activation * rows.moving_bytes
    return result + workspace


def fit_memory(rows: MemoryRows) -> FitResult:
    """Fit (persistent_factor, activation_factor, workspace_bytes) by least squares on
    log memory; factors within 0.05-20, the workspace within 1 MB-20 GB."""

    def residuals(theta: FloatArray) -> FloatArray:
        out: FloatArray = np.log(memory_predict(np.exp(theta), rows)) - np.log(rows.measured_bytes)
        return out

    def logs(*values: float) -> list[float]:
        return [float(np.log(v)) for v in values]

    starts = [logs(1.0, 1.0, 1e9), logs(1.3, 0.5, 3e9), logs(0.8, 1.5, 1e8)]
    theta = least_squares_log(
        residuals, starts, log_low=logs(0.05, 0.05, 1e6), log_high=logs(20.0, 20.0, 2e10)
    )
    params = tuple(float(x) for x in np.exp(theta))
    predicted = memory_predict(params, rows)
    log_error = np.log(predicted) - np.log(rows.measured_bytes)
    return FitResult(
        params=params,
        ratios=tuple(float(x) for x in rows.measured_bytes / predicted),
        rms_log_error=float(np.sqrt(np.mean(log_error**2))),
    )
