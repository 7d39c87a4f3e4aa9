"""The calibration's types and its two formulas: achieved matmul time and collective time.

Everything here is pure data and arithmetic (no file access, no fitting). A ``Calibration``
holds the parameters fitted for one hardware preset by ``benchmarks/calibration.py``; the
formulas turn them into seconds. Every parameter is a physical quantity with its unit in its
name, and every fit records where it came from (``CalibrationSource``).

**Matmul** ``[b,m,k]·[b,k,n] -> [b,m,n]`` (docs/calibration.md, "Matmul model")::

    m', n', k' = m, n, k rounded up to the tile (tile_m, tile_n, tile_k)
    compute_s  = 2·b·m'·n'·(k' + k_overhead_elements) / (compute_efficiency · peak)
    hbm_s      = b·(m·k·lhs_bytes + k·n·rhs_bytes + m·n·out_bytes) / (hbm_efficiency · W_hbm)
    time_s     = launch_floor_s + max(compute_s, hbm_s)

``peak`` and ``W_hbm`` are the preset's datasheet figures; the efficiencies are at most 1 and
every other term is non-negative, so the time is never below the roofline
``max(FLOPs/peak, bytes/W_hbm)``.

**Collective** on ``n`` GPUs (docs/calibration.md, "Collective model")::

    S      = bytes each GPU sends (NCCL's "bus bytes": AG/RS/A2A (n-1)/n of the message,
             AR 2(n-1)/n, a permute the message)
    time_s = latency_s + steps·latency_per_step_s + (sqrt(pipeline_latency_s) + sqrt(S / B))²

with ``B = bus_bytes_per_s``, the achieved per-GPU bandwidth for large messages (NCCL's
"busbw"). The squared term is a pipelined ring with the best chunk size (the classic result
for pipelined collectives: fill/drain cost and bandwidth cost balance at the optimum chunk),
so the achieved bandwidth grows with the message and saturates at ``B``. ``B`` never exceeds
the preset's link bandwidth for the group, so the time never beats the roofline's bandwidth
term.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from ..collectives import Collective
from ..dtypes import canonical_dtype, dtype_bytes
from ..errors import ConfigError, SpecError, UnknownNameError
from ..hardware import LinkKind

#: The message size that separates the "small" and "large" collective regimes (1 MiB).
LARGE_MESSAGE_BYTES = 1 << 20

#: The permute pattern the package's ``collective-permute`` means: a ring shift.
RING_PERMUTE = "ring_i_to_i_plus_1"
#: The permute patterns of XLA's perf-table generator (``collective_perf_table_gen.cc``).
PERMUTE_PATTERNS = (RING_PERMUTE, "two_way_mutual_pairs", "one_way_i_to_i_plus_n/2")


def _finite(
    owner: str,
    name: str,
    value: float,
    *,
    low: float = 0.0,
    high: float = math.inf,
    strict_low: bool = False,
) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = number and math.isfinite(value) and value <= high
    ok = ok and (value > low if strict_low else value >= low)
    if not ok:
        lower = f"> {low:g}" if strict_low else f">= {low:g}"
        upper = "" if high == math.inf else f" and <= {high:g}"
        raise ConfigError(f"{owner}: {name} must be a finite number {lower}{upper}, got {value!r}")


# -- provenance and intervals ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DataFile:
    """One CSV a fit read: its name in the shared data folder and its SHA-256."""

    name: str
    sha256: str

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ConfigError("[source.data_files]: name is empty")
        if len(self.sha256) != 64 or any(c not in "0123456789abcdef" for c in self.sha256):
            raise ConfigError(
                f"[source.data_files] {self.name!r}: sha256 must be 64 lowercase hex digits, "
                f"got {self.sha256!r}"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibrationSource:
    """Where a calibration file's numbers come from: data, split, command, date."""

    data_files: tuple[DataFile, ...]
    data_readme: str  # where the columns and their caveats are documented
    split: str  # which rows were fitted on (the fixed split, in words)
    command: str  # the command that wrote this file
    fitted_on: str  # ISO date of the fit
    notes: str = ""

    def __post_init__(self) -> None:
        if not self.data_files:
            raise ConfigError("[source]: data_files lists no CSV; say what was fitted on")
        for name in ("data_readme", "split", "command", "fitted_on"):
            if not getattr(self, name).strip():
                raise ConfigError(f"[source]: {name} is empty")


@dataclass(frozen=True, slots=True, kw_only=True)
class RatioInterval:
    """The spread of measured/predicted over the calibration rows of a fit: the 10th and
    90th percentiles (``low_ratio``, ``high_ratio``) of ``num_points`` ratios. A calibrated
    time ``t`` is printed with the interval ``[t·low_ratio, t·high_ratio]`` (clipped at the
    roofline below and widened to contain ``t``)."""

    low_ratio: float
    high_ratio: float
    num_points: int

    def __post_init__(self) -> None:
        _finite("interval", "low_ratio", self.low_ratio, strict_low=True)
        _finite("interval", "high_ratio", self.high_ratio, low=self.low_ratio)
        if self.num_points < 1:
            raise ConfigError(f"interval: num_points must be >= 1, got {self.num_points}")


# -- matmul ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class MatmulFit:
    """Achieved-time parameters of one (GPU, operand dtypes) matmul kernel family.

    * ``launch_floor_s``: fixed time of every kernel (launch, prologue, tail); what the
      smallest shapes take.
    * ``compute_efficiency``: fraction of the preset's peak FLOP/s a full machine of
      aligned tiles sustains (at most 1).
    * ``hbm_efficiency``: fraction of the preset's HBM bandwidth a bandwidth-bound matmul
      achieves (at most 1).
    * ``k_overhead_elements``: per-tile fixed work, in elements of the contracting dimension
      (filling the pipeline and writing the output tile): a short ``k`` costs as if it were
      ``k + k_overhead_elements`` long.
    * ``tile_m``, ``tile_n``, ``tile_k``: the tile every dimension is rounded up to. Assumed,
      not fitted (the calibration shapes are all multiples of 256, so the data cannot tell
      tile sizes apart): see ``tile_source``.
    """

    lhs_dtype: str
    rhs_dtype: str
    out_dtype: str
    launch_floor_s: float
    compute_efficiency: float
    hbm_efficiency: float
    k_overhead_elements: float
    tile_m: int
    tile_n: int
    tile_k: int
    tile_source: str
    interval: RatioInterval
    num_calibration_rows: int
    data_key: str  # the dtype key of the rows fitted (e.g. "bf16xbf16->bf16")

    def __post_init__(self) -> None:
        owner = f"matmul {self.data_key or self.lhs_dtype!r}"
        for name in ("lhs_dtype", "rhs_dtype", "out_dtype"):
            value = getattr(self, name)
            try:
                canonical = canonical_dtype(value)
            except UnknownNameError as exc:
                raise ConfigError(f"{owner}: {name}: {exc}") from None
            if canonical != value:
                raise ConfigError(f"{owner}: {name} {value!r} is an alias; write {canonical!r}")
        _finite(owner, "launch_floor_s", self.launch_floor_s)
        _finite(owner, "compute_efficiency", self.compute_efficiency, high=1.0, strict_low=True)
        _finite(owner, "hbm_efficiency", self.hbm_efficiency, high=1.0, strict_low=True)
        _finite(owner, "k_overhead_elements", self.k_overhead_elements)
        for name in ("tile_m", "tile_n", "tile_k"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{owner}: {name} must be >= 1, got {getattr(self, name)}")
        if not self.tile_source.strip():
            raise ConfigError(f"{owner}: tile_source is empty; say where the tile comes from")
        if self.num_calibration_rows < 1:
            raise ConfigError(f"{owner}: num_calibration_rows must be >= 1")

    @property
    def name(self) -> str:
        """``bfloat16`` for a same-dtype matmul, ``float8_e4m3fn x float8_e5m2`` otherwise."""
        if self.lhs_dtype == self.rhs_dtype:
            return self.lhs_dtype
        return f"{self.lhs_dtype} x {self.rhs_dtype}"


def _round_up(value: int, tile: int) -> int:
    return -(-value // tile) * tile


def matmul_bytes(fit: MatmulFit, *, m: int, n: int, k: int, batch: int = 1) -> float:
    """HBM bytes of ``[b,m,k]·[b,k,n] -> [b,m,n]`` in the fit's dtypes (each operand once)."""
    return batch * (
        m * k * dtype_bytes(fit.lhs_dtype)
        + k * n * dtype_bytes(fit.rhs_dtype)
        + m * n * dtype_bytes(fit.out_dtype)
    )


def matmul_terms_s(
    fit: MatmulFit,
    *,
    m: int,
    n: int,
    k: int,
    batch: int = 1,
    peak_flops_per_s: float,
    hbm_bytes_per_s: float,
    hbm_bytes: float | None = None,
) -> tuple[float, float, float]:
    """``(launch_floor_s, compute_s, hbm_s)`` of the module docstring's formula, whose
    time is ``launch_floor_s + max(compute_s, hbm_s)``. ``hbm_bytes`` overrides the bytes
    the kernel moves (default: each operand once, ``matmul_bytes``); a fused kernel that
    keeps a tensor on chip (flash attention's scores) moves fewer."""
    for name, value in (("m", m), ("n", n), ("k", k), ("batch", batch)):
        if value < 1:
            raise SpecError(f"matmul dimension {name} must be >= 1, got {value}")
    m_tiled = _round_up(m, fit.tile_m)
    n_tiled = _round_up(n, fit.tile_n)
    k_tiled = _round_up(k, fit.tile_k)
    compute_s = (
        2.0
        * batch
        * m_tiled
        * n_tiled
        * (k_tiled + fit.k_overhead_elements)
        / (fit.compute_efficiency * peak_flops_per_s)
    )
    moved = matmul_bytes(fit, m=m, n=n, k=k, batch=batch) if hbm_bytes is None else hbm_bytes
    hbm_s = moved / (fit.hbm_efficiency * hbm_bytes_per_s)
    return fit.launch_floor_s, compute_s, hbm_s


def matmul_time_s(
    fit: MatmulFit,
    *,
    m: int,
    n: int,
    k: int,
    batch: int = 1,
    peak_flops_per_s: float,
    hbm_bytes_per_s: float,
) -> float:
    """Achieved seconds of ``[b,m,k]·[b,k,n] -> [b,m,n]`` (the module docstring's formula).

    ``peak_flops_per_s`` and ``hbm_bytes_per_s`` are the preset's datasheet figures for the
    fit's dtype (``ChipSpec.peak_flops_per_s_for``, ``ChipSpec.hbm_bytes_per_s``).
    """
    floor_s, compute_s, hbm_s = matmul_terms_s(
        fit,
        m=m,
        n=n,
        k=k,
        batch=batch,
        peak_flops_per_s=peak_flops_per_s,
        hbm_bytes_per_s=hbm_bytes_per_s,
    )
    return floor_s + max(compute_s, hbm_s)


# -- collectives -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveFit:
    """Achieved-time parameters of one collective on one tier for one group size.

    * ``latency_s``: fixed cost of one collective (launch and synchronisation): with
      ``pipeline_latency_s``, what the smallest messages take.
    * ``latency_per_step_s``: cost of each ring step (``n-1`` per AllGather, ReduceScatter or
      AllToAll over ``n`` GPUs, ``2(n-1)`` per AllReduce, 1 per permute); it carries the
      growth with group size of a fit that spans group sizes (``group_size == 0``).
    * ``pipeline_latency_s``: fill and drain cost of the chunked pipeline; the time is
      ``(sqrt(pipeline_latency_s) + sqrt(S/B))²``, so mid-size messages pay
      ``2·sqrt(pipeline_latency_s·S/B)`` on top of ``S/B``.
    * ``bus_bytes_per_s``: achieved bandwidth per GPU for large messages, in bytes each GPU
      sends per second (NCCL's bus bandwidth); at most the preset's link bandwidth.

    ``group_size`` is the group the fit was measured on (0: any size; the per-step latency
    scales it); ``fitted_group_sizes`` lists the sizes of the rows fitted.
    ``gpus_per_node`` (cross-node fits only, 0 otherwise) is how many GPUs of each node the
    measured groups held: a group with fewer shares fewer NICs, which the fit did not see.
    ``permute_pattern`` names the pattern of a collective-permute fit (empty otherwise).
    """

    op: Collective
    tier: LinkKind
    group_size: int
    fitted_group_sizes: tuple[int, ...]
    gpus_per_node: int = 0
    permute_pattern: str = ""
    latency_s: float
    latency_per_step_s: float
    pipeline_latency_s: float
    bus_bytes_per_s: float
    num_calibration_rows: int
    data_source: str  # which CSV rows (e.g. "xla_gpu_collectives.csv H100 all-gather group 8")

    def __post_init__(self) -> None:
        owner = f"collective {self.op.value} on {self.tier.value} (group {self.group_size})"
        if self.tier not in (LinkKind.NVLINK, LinkKind.INFINIBAND):
            raise ConfigError(f"{owner}: tier must be 'nvlink' or 'infiniband'")
        if self.group_size < 0 or self.group_size == 1:
            raise ConfigError(f"{owner}: group_size must be 0 (any) or >= 2")
        if not self.fitted_group_sizes or min(self.fitted_group_sizes) < 2:
            raise ConfigError(f"{owner}: fitted_group_sizes must list sizes >= 2")
        if self.group_size and self.fitted_group_sizes != (self.group_size,):
            raise ConfigError(
                f"{owner}: a fit for one group size must list exactly that size in "
                f"fitted_group_sizes, got {list(self.fitted_group_sizes)}"
            )
        cross_node = self.tier is LinkKind.INFINIBAND
        if cross_node != (self.gpus_per_node > 0) or self.gpus_per_node < 0:
            raise ConfigError(
                f"{owner}: gpus_per_node must be >= 1 for a cross-node (infiniband) fit and 0 "
                f"for an NVLink one, got {self.gpus_per_node}"
            )
        is_permute = self.op is Collective.COLLECTIVE_PERMUTE
        if is_permute and self.permute_pattern not in PERMUTE_PATTERNS:
            raise ConfigError(
                f"{owner}: permute_pattern {self.permute_pattern!r} is not one of "
                f"{', '.join(PERMUTE_PATTERNS)}"
            )
        if not is_permute and self.permute_pattern:
            raise ConfigError(f"{owner}: permute_pattern is only for collective-permute")
        _finite(owner, "latency_s", self.latency_s)
        _finite(owner, "latency_per_step_s", self.latency_per_step_s)
        _finite(owner, "pipeline_latency_s", self.pipeline_latency_s)
        _finite(owner, "bus_bytes_per_s", self.bus_bytes_per_s, strict_low=True)
        if self.num_calibration_rows < 1:
            raise ConfigError(f"{owner}: num_calibration_rows must be >= 1")


@dataclass(frozen=True, slots=True, kw_only=True)
class CollectiveInterval:
    """The measured/predicted spread of the fits of one op on one tier (every group size
    pooled) over messages in ``[min_message_bytes, max_message_bytes)`` (0: unbounded
    above)."""

    op: Collective
    tier: LinkKind
    min_message_bytes: int
    max_message_bytes: int
    interval: RatioInterval

    def __post_init__(self) -> None:
        if self.min_message_bytes < 0 or (
            self.max_message_bytes and self.max_message_bytes <= self.min_message_bytes
        ):
            raise ConfigError(
                f"{self.op.value} interval on {self.tier.value}: [{self.min_message_bytes}, "
                f"{self.max_message_bytes}) is not a range of message sizes"
            )

    def covers(self, message_bytes: float) -> bool:
        above = message_bytes >= self.min_message_bytes
        return above and (not self.max_message_bytes or message_bytes < self.max_message_bytes)


def ring_steps(op: Collective, group_size: int) -> int:
    """Steps of the ring algorithm NCCL runs: ``n-1`` for AllGather, ReduceScatter and
    AllToAll, ``2(n-1)`` for AllReduce (ReduceScatter then AllGather), 1 for a permute."""
    if group_size <= 1:
        return 0
    if op is Collective.ALL_REDUCE:
        return 2 * (group_size - 1)
    if op is Collective.COLLECTIVE_PERMUTE:
        return 1
    return group_size - 1


def bus_bytes(op: Collective, message_bytes: float, group_size: int) -> float:
    """Bytes each GPU sends, from the message as XLA's perf table and nccl-tests count it
    (AllGather: the gathered output; ReduceScatter: the full input; AllReduce: the buffer;
    AllToAll: one GPU's buffer; permute: the buffer one GPU sends).

    These are nccl-tests' bus-bandwidth factors: ``(n-1)/n`` for AllGather, ReduceScatter and
    AllToAll, ``2(n-1)/n`` for AllReduce, 1 for a permute; they equal
    ``collectives.bytes_sent_per_chip`` for the same collective.
    """
    if group_size <= 1:
        return 0.0
    fraction = (group_size - 1) / group_size
    if op is Collective.ALL_REDUCE:
        return 2 * fraction * message_bytes
    if op is Collective.COLLECTIVE_PERMUTE:
        return float(message_bytes)
    return fraction * message_bytes


def message_bytes_of(op: Collective, group_bytes: float, group_size: int) -> float:
    """The message (as ``bus_bytes`` takes it) from the book's ``V`` of ``collectives.py``:
    the same array, except an AllToAll, whose ``V`` is every GPU's buffer together."""
    if op is Collective.ALL_TO_ALL and group_size > 0:
        return group_bytes / group_size
    return group_bytes


def collective_time_s(fit: CollectiveFit, *, message_bytes: float, group_size: int) -> float:
    """Achieved seconds of ``fit.op`` over ``group_size`` GPUs on a message of
    ``message_bytes`` (the module docstring's formula); 0 for a group of one or no bytes."""
    if group_size <= 1 or message_bytes <= 0:
        return 0.0
    sent = bus_bytes(fit.op, message_bytes, group_size)
    steps = ring_steps(fit.op, group_size)
    pipelined = (math.sqrt(fit.pipeline_latency_s) + math.sqrt(sent / fit.bus_bytes_per_s)) ** 2
    return fit.latency_s + steps * fit.latency_per_step_s + pipelined


# -- the whole training step (fitted on the Playbook runs) ----------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingStepFit:
    """How a training framework turns the calibrated matmuls and collectives of one step
    into its measured step time (docs/calibration.md, "Training step model").

    Per microbatch slot of the slowest pipeline stage::

        device_s  = matmul_s + vector_time_factor·vector_s
        exposed_s = device_s + comm_s - hidden_fraction·min(device_s, comm_s)
        floor_s   = layers·(host_floor_per_layer_s
                            + [P>1]·pipeline_tp_floor_per_layer_step_s·tp_ring_steps)
        slot_s    = max(exposed_s, floor_s) + [P>1]·pipeline_send_s
        step_s    = (m + P - 1)·slot_s + (1 - gradient_hidden_fraction)·gradient_s
                    + optimizer_s + fixed_step_s

    * ``hidden_fraction``: the share of the per-microbatch communication (tensor-parallel
      gathers and reductions, FSDP gathers) that runs under compute (0: none, 1: as much
      as the compute time covers).
    * ``gradient_hidden_fraction``: the share of the once-per-step gradient reductions
      hidden under the last backward pass.
    * ``host_floor_per_layer_s``: the host's time to issue one layer's kernels for one
      microbatch, forward and backward; the device cannot run faster than the host feeds it.
    * ``pipeline_tp_floor_per_layer_step_s``: in a pipelined step, the extra floor per layer
      and per ring step of its tensor-parallel group (the stage-to-stage traffic serialises
      with the tensor-parallel collectives); an empirical term, see the docs.
    * ``pipeline_send_s``: per microbatch slot of a pipelined step, the stage-boundary send
      and receive that the schedule does not hide.
    * ``fixed_step_s``: per step (optimizer bookkeeping, logging, data loading).
    * ``vector_time_factor``: the memory-bound ops' (norms, activations, softmax, the loss)
      time over their HBM roofline (at least 1: unfused kernels re-read their inputs).
    * ``gradient_reduce_dtype``: the dtype the framework reduces gradients in (nanotron
      accumulates and reduces them in float32); assumed, not fitted.
    * ``framework``: which framework and settings the fit describes.
    """

    framework: str
    gradient_reduce_dtype: str
    hidden_fraction: float
    gradient_hidden_fraction: float
    host_floor_per_layer_s: float
    pipeline_tp_floor_per_layer_step_s: float
    pipeline_send_s: float
    fixed_step_s: float
    vector_time_factor: float
    interval: RatioInterval
    num_calibration_rows: int
    data_source: str

    def __post_init__(self) -> None:
        owner = "training step"
        if not self.framework.strip():
            raise ConfigError(f"{owner}: framework is empty; say which framework was measured")
        try:
            canonical = canonical_dtype(self.gradient_reduce_dtype)
        except UnknownNameError as exc:
            raise ConfigError(f"{owner}: gradient_reduce_dtype: {exc}") from None
        if canonical != self.gradient_reduce_dtype:
            raise ConfigError(
                f"{owner}: gradient_reduce_dtype {self.gradient_reduce_dtype!r} is an alias; "
                f"write {canonical!r}"
            )
        _finite(owner, "hidden_fraction", self.hidden_fraction, high=1.0)
        _finite(owner, "gradient_hidden_fraction", self.gradient_hidden_fraction, high=1.0)
        for name in (
            "host_floor_per_layer_s",
            "pipeline_tp_floor_per_layer_step_s",
            "pipeline_send_s",
            "fixed_step_s",
        ):
            _finite(owner, name, getattr(self, name))
        _finite(owner, "vector_time_factor", self.vector_time_factor, low=1.0)
        if self.num_calibration_rows < 1:
            raise ConfigError(f"{owner}: num_calibration_rows must be >= 1")


class StallDecision(enum.Enum):
    """How the calibrated step summarises a stall's two outcomes (``StallFit.decision``):
    the step is ``base + share·stall_s`` with

    * ``median``: share 1 where ``P(stall) >= 1/2``, else 0 (the likelier outcome);
    * ``mean``: share ``P(stall)`` (the expected step time: what a run's wall-clock budget
      needs, over the runs of a cluster that stalls this often);
    * ``relative-error``: share 1 where ``P·r > 1 - P``, else 0, with ``r`` the stalled over
      the unstalled step: the outcome whose tokens/s has the smaller expected error
      relative to the measurement (missing a stall costs ``r - 1``, calling one that does
      not happen at most ``1 - 1/r``).
    """

    MEDIAN = "median"
    MEAN = "mean"
    RELATIVE_ERROR = "relative-error"


def stall_share(decision: StallDecision, probability: Any, stall_ratio: Any) -> Any:
    """The share of the stall the reported step carries under ``decision`` (numbers or
    numpy arrays alike); ``stall_ratio`` is the stalled over the unstalled step."""
    if decision is StallDecision.MEAN:
        return probability * (stall_ratio * 0.0 + 1.0)  # broadcast to the ratio's shape
    if decision is StallDecision.MEDIAN:
        chosen = probability >= 0.5
    else:
        chosen = probability * stall_ratio > 1.0 - probability
    return chosen * 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StallFit:
    """The Playbook's second population of steps: runs that lose about half a second per
    microbatch slot and per pipeline neighbour, in runs whose twins (the same model, nodes
    and parallelism, another ZeRO stage or microbatch size) often run at the predicted
    speed (docs/calibration.md, "Stalls"). Whether a given run stalls is not a function of
    its configuration, only how often runs like it do, so the model gives a probability::

        P(stall) = 1 - (1 - hazard_per_node[class])^nodes
                   · (1 - memory_pressure_probability·[memory > memory_pressure_fraction·C])
        stall_s  = (m + P - 1) · exchanges · stall_per_exchange_s
        step_s   = base step + share · stall_s        (share: ``decision``, 0..1)

    * ``stall_per_exchange_s``: the time a stalled step loses per microbatch slot and per
      stage-to-stage exchange (``exchanges`` is 2 for a stage with two pipeline neighbours,
      ``P >= 3``; 1 otherwise);
    * ``hazard_per_node_pipelined``, ``hazard_per_node_unpipelined``: the probability that
      one node makes the job stall (independent nodes; any one stalls every stage), for
      pipelined and unpipelined runs;
    * ``hazard_per_node_pipelined_zero0``: the same for pipelined runs with data
      parallelism and ZeRO-0 (each data-parallel rank holds the whole optimizer state);
      None: as ``hazard_per_node_pipelined`` (the fit chose one class for both);
    * ``memory_pressure_fraction``: the predicted memory, as a share of the capacity, above
      which the caching allocator runs short and the step stalls with probability
      ``memory_pressure_probability``;
    * ``decision``: how the calibrated step summarises the two outcomes (``StallDecision``);
    * ``stall_ratio``: a calibration run counts as stalled when measured over predicted
      base step exceeds this (assumed: the gap in the calibration runs' ratios).
    """

    stall_per_exchange_s: float
    hazard_per_node_pipelined: float
    hazard_per_node_unpipelined: float
    memory_pressure_fraction: float
    memory_pressure_probability: float
    stall_ratio: float
    num_calibration_rows: int
    num_stalled_rows: int
    data_source: str
    hazard_per_node_pipelined_zero0: float | None = None
    decision: StallDecision = StallDecision.MEDIAN

    def __post_init__(self) -> None:
        owner = "stall"
        _finite(owner, "stall_per_exchange_s", self.stall_per_exchange_s)
        for name in (
            "hazard_per_node_pipelined",
            "hazard_per_node_unpipelined",
            "memory_pressure_probability",
        ):
            _finite(owner, name, getattr(self, name), high=1.0)
        if self.hazard_per_node_pipelined_zero0 is not None:
            _finite(
                owner,
                "hazard_per_node_pipelined_zero0",
                self.hazard_per_node_pipelined_zero0,
                high=1.0,
            )
        decision: object = self.decision
        if not isinstance(decision, StallDecision):  # a string from Python code
            valid = [d.value for d in StallDecision]
            if decision not in valid:
                raise ConfigError(
                    f"{owner}: decision {decision!r}; expected one of {', '.join(map(repr, valid))}"
                )
            object.__setattr__(self, "decision", StallDecision(decision))
        _finite(owner, "memory_pressure_fraction", self.memory_pressure_fraction, strict_low=True)
        _finite(owner, "stall_ratio", self.stall_ratio, low=1.0, strict_low=True)
        if self.num_calibration_rows < 1:
            raise ConfigError(f"{owner}: num_calibration_rows must be >= 1")
        if not 0 <= self.num_stalled_rows <= self.num_calibration_rows:
            raise ConfigError(f"{owner}: num_stalled_rows must be in 0..num_calibration_rows")

    def hazard_per_node(self, *, pipelined: bool, zero0_data_parallel: bool) -> float:
        """The per-node hazard of a run's class."""
        if not pipelined:
            return self.hazard_per_node_unpipelined
        if zero0_data_parallel and self.hazard_per_node_pipelined_zero0 is not None:
            return self.hazard_per_node_pipelined_zero0
        return self.hazard_per_node_pipelined

    def share(self, probability: float, stall_ratio: float) -> float:
        """The share of the stall the calibrated step carries (``decision``), for a run
        that stalls with ``probability`` and is then ``stall_ratio`` times slower."""
        return float(stall_share(self.decision, probability, stall_ratio))


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryOverheadFit:
    """Measured memory per GPU from the planner's memory breakdown::

        memory = persistent_factor·(params + grads + optimizer
                                    + grad_accumulation_bytes_per_param·local_params)
                 + activation_factor·(activations + transient) + workspace_bytes

    * ``persistent_factor``: allocator rounding and fragmentation over the persistent
      buffers (at least 1 when the accounting is complete).
    * ``activation_factor``: the framework's saved activations and transients over the
      planner's count (below 1 when it frees or shards more than the planner assumes).
    * ``workspace_bytes``: fixed bytes per GPU (CUDA context, NCCL and cuBLAS workspaces).
    * ``grad_accumulation_bytes_per_param``: a gradient-accumulation buffer per local
      parameter beside the gradients (nanotron: float32, 4 bytes); assumed, not fitted.
    * ``capacity_bytes``: the memory above which a run is called out of memory (the
      Playbook's 80 GB, in its own units).
    """

    persistent_factor: float
    activation_factor: float
    workspace_bytes: float
    grad_accumulation_bytes_per_param: float
    capacity_bytes: float
    interval: RatioInterval
    num_calibration_rows: int
    data_source: str

    def __post_init__(self) -> None:
        owner = "memory"
        _finite(owner, "persistent_factor", self.persistent_factor, strict_low=True)
        _finite(owner, "activation_factor", self.activation_factor, strict_low=True)
        _finite(owner, "workspace_bytes", self.workspace_bytes)
        _finite(owner, "grad_accumulation_bytes_per_param", self.grad_accumulation_bytes_per_param)
        _finite(owner, "capacity_bytes", self.capacity_bytes, strict_low=True)
        if self.num_calibration_rows < 1:
            raise ConfigError(f"{owner}: num_calibration_rows must be >= 1")


# -- one preset's calibration ----------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Calibration:
    """Every fitted parameter for one hardware preset (``preset``: its name, e.g.
    ``h100``). Parts without calibration data are empty (no matmul fits for a GPU whose
    GEMMs were not measured) or ``None`` (the training-step and memory fits, which only the
    H100's Playbook runs provide)."""

    preset: str
    description: str
    source: CalibrationSource
    matmul: tuple[MatmulFit, ...] = ()
    collectives: tuple[CollectiveFit, ...] = ()
    collective_intervals: tuple[CollectiveInterval, ...] = ()
    step: TrainingStepFit | None = None
    memory: MemoryOverheadFit | None = None
    stall: StallFit | None = None
    path: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        where = self.path or self.preset
        seen: set[tuple[str, str]] = set()
        for fit in self.matmul:
            key = (fit.lhs_dtype, fit.rhs_dtype)
            if key in seen:
                raise ConfigError(f"{where}: two matmul fits for {fit.name}")
            seen.add(key)
        buckets: set[tuple[Collective, LinkKind, int, str]] = set()
        for cfit in self.collectives:
            bucket = (cfit.op, cfit.tier, cfit.group_size, cfit.permute_pattern)
            if bucket in buckets:
                raise ConfigError(
                    f"{where}: two collective fits for {cfit.op.value} on {cfit.tier.value}, "
                    f"group {cfit.group_size} {cfit.permute_pattern}".rstrip()
                )
            buckets.add(bucket)
        for op, tier in sorted(
            {(c.op, c.tier) for c in self.collectives},
            key=lambda item: (item[0].value, item[1].value),
        ):
            if not any(i.op is op and i.tier is tier for i in self.collective_intervals):
                raise ConfigError(
                    f"{where}: no interval for the {op.value} fits on {tier.value}; every "
                    "fitted op and tier needs one"
                )

    def matmul_fit(self, lhs_dtype: str, rhs_dtype: str | None = None) -> MatmulFit | None:
        """The fit for ``lhs_dtype x rhs_dtype`` (both ``lhs_dtype`` by default), or None."""
        lhs = canonical_dtype(lhs_dtype)
        rhs = canonical_dtype(rhs_dtype) if rhs_dtype else lhs
        for fit in self.matmul:
            if (fit.lhs_dtype, fit.rhs_dtype) == (lhs, rhs):
                return fit
        return None

    def collective_fit(
        self,
        op: Collective,
        group_size: int,
        tier: LinkKind,
        *,
        gpus_per_node: int = 0,
        permute_pattern: str = RING_PERMUTE,
    ) -> tuple[CollectiveFit, str] | None:
        """The fit for ``op`` over ``group_size`` GPUs on ``tier``, and a note on how it was
        chosen; None when the calibration has none for that op and tier (on InfiniBand: for
        groups holding ``gpus_per_node`` GPUs of each node).

        Choice: the fit measured on exactly that group size; else a fit for any size; else
        the smallest measured group larger than the request (a larger group is no faster);
        else the largest measured group (an extrapolation, said in the note).
        """
        pattern = permute_pattern if op is Collective.COLLECTIVE_PERMUTE else ""
        per_node = gpus_per_node if tier is LinkKind.INFINIBAND else 0
        fits = [
            c
            for c in self.collectives
            if c.op is op
            and c.tier is tier
            and c.permute_pattern == pattern
            and c.gpus_per_node == per_node
        ]
        if not fits:
            return None
        for fit in fits:
            if fit.group_size == group_size:
                return fit, f"fitted on groups of {group_size}"
        for fit in fits:
            if fit.group_size == 0:
                sizes = fit.fitted_group_sizes
                inside = min(sizes) <= group_size <= max(sizes)
                span = f"groups of {min(sizes)}-{max(sizes)}"
                return fit, f"fitted on {span}" + (
                    "" if inside else f"; extrapolated to {group_size}"
                )
        larger = sorted((f for f in fits if f.group_size > group_size), key=lambda f: f.group_size)
        if larger:
            return larger[0], f"group of {group_size} costed as the measured {larger[0].group_size}"
        largest = max(fits, key=lambda f: f.group_size)
        return largest, (
            f"group of {group_size} extrapolated from the largest measured, {largest.group_size}"
        )

    def collective_interval(
        self, op: Collective, tier: LinkKind, message_bytes: float
    ) -> RatioInterval | None:
        """The interval of ``op``'s fits on ``tier`` for a message of ``message_bytes``."""
        for item in self.collective_intervals:
            if item.op is op and item.tier is tier and item.covers(message_bytes):
                return item.interval
        return None
