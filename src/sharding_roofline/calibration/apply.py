"""Calibrated figures beside their roofline: what the report prints with ``--calibrated``.

Every function returns a ``CalibratedTime``: the roofline time (datasheet peaks, what the
tool prints today), the calibrated time with its interval and source when the preset has
calibration data for the case, or the roofline alone with the reason when it has none
("no calibration data for tpu-v5e: roofline only").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

from ..collectives import Collective, collective_cost
from ..dtypes import canonical_dtype, dtype_bytes
from ..einsum import Einsum
from ..errors import ConfigError, SpecError
from ..hardware import HardwareSpec, LinkKind
from ..mesh import DeviceMesh
from ..units import format_seconds
from .files import load_calibration
from .model import (
    RING_PERMUTE,
    Calibration,
    RatioInterval,
    collective_time_s,
    matmul_bytes,
    matmul_time_s,
    message_bytes_of,
)


class _Shipped:
    """Marker default: use the calibration shipped for the hardware's preset."""

    def __repr__(self) -> str:
        return "SHIPPED"


SHIPPED: Final = _Shipped()


@dataclass(frozen=True, slots=True, kw_only=True)
class CalibratedTime:
    """One figure, calibrated where the data allow, always with its roofline.

    * ``roofline_s``: the roofline time at datasheet peaks (what the report prints today).
    * ``bound_s``: the part of the roofline that comes from datasheet figures, which a
      calibrated time never beats: the whole roofline of a matmul, the bandwidth term of a
      collective (its latency term comes from NCCL's tuning constants, which measured small
      messages do beat).
    * ``calibrated_s``, ``low_s``, ``high_s``: the calibrated time and its interval (the
      10th-90th percentile of measured/predicted on the calibration rows); None when there
      is no calibration for this case.
    * ``source``: where the calibrated figure comes from, or why there is none.
    """

    what: str
    roofline_s: float
    bound_s: float
    calibrated_s: float | None
    low_s: float | None
    high_s: float | None
    source: str

    def __post_init__(self) -> None:
        given = [x is None for x in (self.calibrated_s, self.low_s, self.high_s)]
        if any(given) and not all(given):
            raise ConfigError(f"{self.what}: calibrated_s, low_s and high_s come together")
        if self.bound_s > self.roofline_s * (1 + 1e-9):
            raise ConfigError(f"{self.what}: bound_s {self.bound_s} exceeds roofline_s")
        if self.calibrated_s is not None and self.low_s is not None and self.high_s is not None:
            tolerance = self.bound_s * 1e-9
            if self.calibrated_s < self.bound_s - tolerance:
                raise ConfigError(
                    f"{self.what}: calibrated {self.calibrated_s:.6g} s beats the datasheet bound "
                    f"{self.bound_s:.6g} s; the calibration ({self.source}) claims more than the "
                    "hardware's peak, so its file is wrong (an efficiency above 1 or a "
                    "bandwidth above the link's)"
                )
            if not self.low_s - tolerance <= self.calibrated_s <= self.high_s + tolerance:
                raise ConfigError(f"{self.what}: the interval does not contain the figure")

    @property
    def is_calibrated(self) -> bool:
        return self.calibrated_s is not None

    @property
    def time_s(self) -> float:
        """The calibrated time where there is one, else the roofline."""
        return self.roofline_s if self.calibrated_s is None else self.calibrated_s

    def describe(self) -> str:
        """``12.3 us calibrated (10.9-13.8 us), roofline 9.8 us [source]``, or the roofline
        and the reason there is no calibrated figure."""
        roofline = format_seconds(self.roofline_s)
        if self.calibrated_s is None or self.low_s is None or self.high_s is None:
            return f"{roofline} roofline ({self.source})"
        return (
            f"{format_seconds(self.calibrated_s)} calibrated "
            f"({format_seconds(self.low_s)}-{format_seconds(self.high_s)}), "
            f"roofline {roofline} [{self.source}]"
        )


def _with_interval(point_s: float, bound_s: float, interval: RatioInterval) -> tuple[float, float]:
    """``[point·low_ratio, point·high_ratio]``, widened to contain the point and clipped at
    the datasheet bound below."""
    low = max(bound_s, point_s * min(interval.low_ratio, 1.0))
    high = point_s * max(interval.high_ratio, 1.0)
    return low, high


def _resolve(
    hardware: HardwareSpec, calibration: Calibration | _Shipped | None
) -> Calibration | None:
    if isinstance(calibration, _Shipped):
        return load_calibration(hardware.name)
    return calibration


def _roofline_only(what: str, roofline_s: float, bound_s: float, reason: str) -> CalibratedTime:
    return CalibratedTime(
        what=what,
        roofline_s=roofline_s,
        bound_s=bound_s,
        calibrated_s=None,
        low_s=None,
        high_s=None,
        source=reason,
    )


def _provenance(calibration: Calibration, detail: str) -> str:
    where = calibration.path or f"{calibration.preset}.json"
    source = calibration.source
    return f"{where}: {detail}; fitted {source.fitted_on} by {source.command!r}"


# -- matmuls ---------------------------------------------------------------------------------


def gemm_dims(einsum: Einsum) -> tuple[int, int, int, int]:
    """``(batch, m, n, k)`` of a two-operand einsum seen as a batched GEMM: batch letters
    (in both operands and the output), lhs-only free letters (m), rhs-only free letters (n),
    and the contracted letters folded into k; each group multiplied together, so
    ``2·batch·m·n·k == einsum.dot_flops``. Letters summed within one operand are reduced out
    of it before the dot (``einsum.reduce_flops``, vector work) and are not the GEMM's."""
    spec = einsum.spec
    batch_letters = set(spec.batch)
    m_letters = {c for c in spec.lhs if c in spec.out and c not in spec.rhs}
    n_letters = {c for c in spec.rhs if c in spec.out and c not in spec.lhs}
    k_letters = set(spec.contracting)
    batch = math.prod(einsum.size(c) for c in sorted(batch_letters))
    m = math.prod(einsum.size(c) for c in sorted(m_letters))
    n = math.prod(einsum.size(c) for c in sorted(n_letters))
    k = math.prod(einsum.size(c) for c in sorted(k_letters))
    return batch, m, n, k


def calibrated_matmul(
    hardware: HardwareSpec,
    *,
    m: int,
    n: int,
    k: int,
    dtype: str,
    batch: int = 1,
    rhs_dtype: str | None = None,
    calibration: Calibration | _Shipped | None = SHIPPED,
) -> CalibratedTime:
    """The time of one ``[batch,m,k]·[batch,k,n]`` matmul on one chip of ``hardware``.

    ``dtype`` is the lhs dtype (and the rhs's unless ``rhs_dtype`` is given). The roofline
    is ``max(FLOPs/peak, bytes/W_hbm)`` with the preset's peak for ``dtype``; the calibrated
    time is ``model.matmul_time_s`` with the preset's fitted parameters for those dtypes.
    """
    for name, value in (("m", m), ("n", n), ("k", k), ("batch", batch)):
        if value < 1:
            raise SpecError(f"matmul dimension {name}={value} must be a positive integer")
    lhs = canonical_dtype(dtype)
    rhs = canonical_dtype(rhs_dtype) if rhs_dtype else lhs
    chip = hardware.chip
    peak = min(chip.peak_flops_per_s_for(lhs), chip.peak_flops_per_s_for(rhs))
    flops = 2.0 * batch * m * n * k
    name = lhs if rhs == lhs else f"{lhs} x {rhs}"
    what = f"matmul {name} [{batch},{m},{k}]·[{batch},{k},{n}]"
    resolved = _resolve(hardware, calibration)
    fit = resolved.matmul_fit(lhs, rhs) if resolved is not None else None
    if resolved is None or fit is None:
        hbm_bytes = batch * (
            m * k * dtype_bytes(lhs) + k * n * dtype_bytes(rhs) + m * n * dtype_bytes(lhs)
        )
        roofline = max(flops / peak, hbm_bytes / chip.hbm_bytes_per_s)
        if resolved is None:
            reason = f"no calibration data for {hardware.name}: roofline only"
        else:
            have = ", ".join(f.name for f in resolved.matmul) or "none"
            reason = (
                f"no matmul calibration for {name} on "
                f"{hardware.name} (calibrated: {have}): roofline only"
            )
        return _roofline_only(what, roofline, roofline, reason)
    hbm_bytes = matmul_bytes(fit, m=m, n=n, k=k, batch=batch)
    roofline = max(flops / peak, hbm_bytes / chip.hbm_bytes_per_s)
    point = matmul_time_s(
        fit,
        m=m,
        n=n,
        k=k,
        batch=batch,
        peak_flops_per_s=peak,
        hbm_bytes_per_s=chip.hbm_bytes_per_s,
    )
    low, high = _with_interval(point, roofline, fit.interval)
    detail = f"matmul {fit.data_key} fit on {fit.num_calibration_rows} calibration rows"
    return CalibratedTime(
        what=what,
        roofline_s=roofline,
        bound_s=roofline,
        calibrated_s=point,
        low_s=low,
        high_s=high,
        source=_provenance(resolved, detail),
    )


def achieved_matmul_flops_per_s(
    hardware: HardwareSpec,
    *,
    m: int,
    n: int,
    k: int,
    dtype: str,
    batch: int = 1,
    rhs_dtype: str | None = None,
    calibration: Calibration | _Shipped | None = SHIPPED,
) -> float | None:
    """Achieved FLOP/s of the matmul (``2·batch·m·n·k`` over ``calibrated_matmul``'s time),
    or None where the preset has no calibration for ``dtype`` (the roofline's rate is then
    the datasheet peak, or the HBM roof)."""
    figure = calibrated_matmul(
        hardware,
        m=m,
        n=n,
        k=k,
        dtype=dtype,
        batch=batch,
        rhs_dtype=rhs_dtype,
        calibration=calibration,
    )
    if figure.calibrated_s is None:
        return None
    return 2.0 * batch * m * n * k / figure.calibrated_s


def calibrated_einsum(
    hardware: HardwareSpec,
    einsum: Einsum,
    *,
    calibration: Calibration | _Shipped | None = SHIPPED,
) -> CalibratedTime:
    """``calibrated_matmul`` of an einsum's (local) shapes, via ``gemm_dims``."""
    batch, m, n, k = gemm_dims(einsum)
    return calibrated_matmul(
        hardware, m=m, n=n, k=k, batch=batch, dtype=einsum.dtype, calibration=calibration
    )


# -- collectives -----------------------------------------------------------------------------


def gpus_per_node(mesh: DeviceMesh, axes: tuple[str, ...] | list[str]) -> int:
    """How many GPUs of each NVLink domain a group over ``axes`` holds (1 when it takes one
    GPU per node)."""
    for span in mesh.group(axes).spans:
        if span.tier.link is LinkKind.NVLINK:
            return span.num_children
    return 1


def group_tier(mesh: DeviceMesh, axes: tuple[str, ...] | list[str]) -> LinkKind | None:
    """The tier a collective over ``axes`` is calibrated on: ``INFINIBAND`` when the group
    spans NVLink domains, ``NVLINK`` inside one, None on a TPU (no GPU tiers)."""
    spans = mesh.group(axes).spans
    links = {span.tier.link for span in spans}
    if LinkKind.INFINIBAND in links:
        return LinkKind.INFINIBAND
    if links and links <= {LinkKind.NVLINK}:
        return LinkKind.NVLINK
    return None


def calibrated_collective(
    mesh: DeviceMesh,
    kind: Collective,
    axes: tuple[str, ...] | list[str],
    *,
    elements_in_per_chip: int,
    dtype: str,
    permute_pattern: str = RING_PERMUTE,
    calibration: Calibration | _Shipped | None = SHIPPED,
) -> CalibratedTime:
    """``collectives.collective_cost`` (the roofline) beside the calibrated time of the same
    collective: ``model.collective_time_s`` with the fit for its op, group size and tier."""
    cost = collective_cost(mesh, kind, axes, elements_in_per_chip=elements_in_per_chip, dtype=dtype)
    hardware = mesh.hardware
    size = cost.group_size
    message = message_bytes_of(kind, cost.group_bytes, size)
    tier = group_tier(mesh, cost.axes) if size > 1 else None
    tier_text = f", {tier.value}" if tier else ""
    what = f"{kind.value} over {'+'.join(cost.axes)} ({size} chips{tier_text})"
    if size <= 1 or message == 0:
        return CalibratedTime(
            what=what,
            roofline_s=0.0,
            bound_s=0.0,
            calibrated_s=0.0,
            low_s=0.0,
            high_s=0.0,
            source="a group of one chip or an empty message costs nothing",
        )
    resolved = _resolve(hardware, calibration)
    if resolved is None:
        return _roofline_only(
            what,
            cost.time_s,
            cost.bandwidth_s,
            f"no calibration data for {hardware.name}: roofline only",
        )
    if tier is None:
        return _roofline_only(
            what,
            cost.time_s,
            cost.bandwidth_s,
            f"no calibration for {hardware.name}'s links: roofline only",
        )
    per_node = gpus_per_node(mesh, cost.axes)
    found = resolved.collective_fit(
        kind, size, tier, gpus_per_node=per_node, permute_pattern=permute_pattern
    )
    interval = resolved.collective_interval(kind, tier, message)
    if found is None or interval is None:
        measured = sorted(
            {c.gpus_per_node for c in resolved.collectives if c.op is kind and c.tier is tier}
        )
        if tier is LinkKind.INFINIBAND and measured:
            reason = (
                f"no {kind.value} calibration on {tier.value} for {hardware.name} groups with "
                f"{per_node} GPU{'s' if per_node > 1 else ''} per node (measured: "
                f"{', '.join(map(str, measured))} per node): roofline only"
            )
        else:
            reason = (
                f"no {kind.value} calibration on {tier.value} for {hardware.name}: roofline only"
            )
        return _roofline_only(what, cost.time_s, cost.bandwidth_s, reason)
    fit, how = found
    point = collective_time_s(fit, message_bytes=message, group_size=size)
    low, high = _with_interval(point, cost.bandwidth_s, interval)
    detail = f"{fit.data_source}, {how}"
    return CalibratedTime(
        what=what,
        roofline_s=cost.time_s,
        bound_s=cost.bandwidth_s,
        calibrated_s=point,
        low_s=low,
        high_s=high,
        source=_provenance(resolved, detail),
    )
