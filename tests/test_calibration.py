"""The calibration layer: the fixed split (counted from the shared CSVs), the two formulas
(hand-computed examples and their physics), the shipped files (strict loading), and the
rule that a calibrated figure never beats the datasheet."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sharding_roofline import DeviceMesh, Einsum, list_presets, load_preset
from sharding_roofline.calibration import (
    CalibratedTime,
    Calibration,
    CollectiveFit,
    MatmulFit,
    RatioInterval,
    achieved_matmul_flops_per_s,
    calibrated_collective,
    calibrated_einsum,
    calibrated_matmul,
    collective_time_s,
    gemm_dims,
    list_calibrations,
    load_calibration,
    matmul_time_s,
    write_calibration,
)
from sharding_roofline.calibration import data as sd
from sharding_roofline.calibration.fit import (
    CollectiveRows,
    MatmulRows,
    fit_collective_bucket,
    fit_matmul,
    fold_masks,
)
from sharding_roofline.calibration.model import (
    LARGE_MESSAGE_BYTES,
    RING_PERMUTE,
    bus_bytes,
    matmul_bytes,
    message_bytes_of,
    ring_steps,
)
from sharding_roofline.collectives import Collective, bytes_sent_per_chip, collective_cost
from sharding_roofline.errors import ConfigError, UnknownNameError
from sharding_roofline.hardware import LinkKind

REPO = Path(__file__).resolve().parents[1]
DATA = sd.find_data_dir(REPO)
needs_data = pytest.mark.skipif(
    DATA is None,
    reason=(
        "the shared data folder is absent (looked at $SR_SHARED_DATA, <repo>/../shared/data "
        "and <repo>/../../shared/data); CI has it at ../shared/data"
    ),
)
SHIPPED = ("b200", "gb200-nvl72", "h100")


def _fit(**changes: object) -> MatmulFit:
    base = MatmulFit(
        lhs_dtype="bfloat16",
        rhs_dtype="bfloat16",
        out_dtype="bfloat16",
        launch_floor_s=5e-6,
        compute_efficiency=0.5,
        hbm_efficiency=0.8,
        k_overhead_elements=64.0,
        tile_m=128,
        tile_n=128,
        tile_k=64,
        tile_source="test",
        interval=RatioInterval(low_ratio=0.9, high_ratio=1.2, num_points=10),
        num_calibration_rows=10,
        data_key="test",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _collective(**changes: object) -> CollectiveFit:
    base = CollectiveFit(
        op=Collective.ALL_GATHER,
        tier=LinkKind.NVLINK,
        group_size=4,
        fitted_group_sizes=(4,),
        latency_s=10e-6,
        latency_per_step_s=1e-6,
        pipeline_latency_s=4e-6,
        bus_bytes_per_s=100e9,
        num_calibration_rows=10,
        data_source="test",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def _csv(name: str) -> list[dict[str, str]]:
    assert DATA is not None
    with (DATA / name).open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------------------
# The split, counted from the files


@needs_data
@pytest.mark.parametrize("name", [*sd.MATMUL_FILES.values(), sd.COLLECTIVES_FILE])
def test_xla_tables_fit_exactly_the_even_rows(name: str) -> None:
    """Row index = 0-based position under the header; even index = calibration."""
    assert DATA is not None
    rows = sd.read_rows(DATA, name)
    assert [r.index for r in rows] == list(range(len(_csv(name))))
    calibration = [r.index for r in rows if sd.split_of(name, r) is sd.Split.CALIBRATION]
    assert calibration == list(range(0, len(rows), 2))
    assert sd.split_counts(DATA)[name] == {
        "calibration": (len(rows) + 1) // 2,
        "heldout": len(rows) // 2,
    }


@needs_data
def test_split_counts_match_the_issue() -> None:
    assert DATA is not None
    counts = sd.split_counts(DATA)
    runs = _csv(sd.PLAYBOOK_RUNS_FILE)
    fit_runs = [r for r in runs if r["model"] in ("1B", "8B") and 1 <= int(r["nodes"]) <= 8]
    sweep = _csv(sd.PLAYBOOK_COLLECTIVES_FILE)
    fit_sweep = [r for r in sweep if int(r["nodes"]) <= 8]
    assert counts[sd.PLAYBOOK_RUNS_FILE] == {
        "calibration": len(fit_runs),
        "heldout": len(runs) - len(fit_runs),
    }
    assert counts[sd.PLAYBOOK_COLLECTIVES_FILE] == {
        "calibration": len(fit_sweep),
        "heldout": len(sweep) - len(fit_sweep),
    }
    held_nodes = {int(r["nodes"]) for r in sweep if int(r["nodes"]) > 8}
    assert held_nodes == {16, 32, 64}
    for name in (sd.PLAYBOOK_FAILED_FILE, sd.TORCHTITAN_FILE):
        assert counts[name] == {"heldout": len(_csv(name))}
    assert counts[sd.PLAYBOOK_MODELS_FILE] == {"reference": len(_csv(sd.PLAYBOOK_MODELS_FILE))}
    # the numbers the docs quote
    assert counts[sd.COLLECTIVES_FILE] == {"calibration": 1699, "heldout": 1698}
    assert counts[sd.PLAYBOOK_RUNS_FILE]["calibration"] == 432


@needs_data
def test_heldout_models_and_node_counts_are_never_calibration() -> None:
    assert DATA is not None
    for row in sd.read_rows(DATA, sd.PLAYBOOK_RUNS_FILE):
        if row["model"] in ("3B", "80B") or int(row["nodes"]) >= 16:
            assert sd.split_of(sd.PLAYBOOK_RUNS_FILE, row) is sd.Split.HELDOUT


def test_a_file_without_a_split_is_an_error() -> None:
    with pytest.raises(UnknownNameError, match=r"no split is defined for data file 'x\.csv'"):
        sd.split_of("x.csv", sd.Row(index=0, cells={}))


@needs_data
@pytest.mark.parametrize("preset", SHIPPED)
def test_shipped_files_were_fitted_on_this_data(preset: str) -> None:
    """The recorded SHA-256 of every CSV matches the data folder, and every matmul fit
    counts exactly the calibration rows of its dtype key."""
    assert DATA is not None
    calibration = load_calibration(preset)
    assert calibration is not None
    for data_file in calibration.source.data_files:
        assert sd.file_sha256(DATA, data_file.name) == data_file.sha256, (
            f"{preset}.json was fitted on another {data_file.name}; rerun benchmarks/calibration.py"
        )
    for fit in calibration.matmul:
        name, key = fit.data_key.split(" ")
        even = [r for r in sd.read_rows(DATA, name) if r.index % 2 == 0 and r["dtype_key"] == key]
        assert fit.num_calibration_rows == len(even)


# --------------------------------------------------------------------------------------
# Matmul formula


def test_matmul_time_by_hand() -> None:
    fit = _fit()
    m, n, k, batch = 1000, 1000, 1000, 2
    peak, hbm = 1e15, 2e12
    m_tiled, n_tiled, k_tiled = 1024, 1024, 1024  # rounded up to 128, 128, 64
    compute_s = 2 * batch * m_tiled * n_tiled * (k_tiled + 64) / (0.5 * peak)
    bytes_moved = batch * (m * k * 2 + k * n * 2 + m * n * 2)  # bf16 operands, unpadded
    hbm_s = bytes_moved / (0.8 * hbm)
    expected = 5e-6 + max(compute_s, hbm_s)
    assert matmul_bytes(fit, m=m, n=n, k=k, batch=batch) == bytes_moved
    got = matmul_time_s(fit, m=m, n=n, k=k, batch=batch, peak_flops_per_s=peak, hbm_bytes_per_s=hbm)
    assert got == pytest.approx(expected, rel=1e-12)
    assert compute_s > hbm_s  # this shape is compute-bound: the example tests that branch
    skinny = matmul_time_s(fit, m=1, n=8192, k=8192, peak_flops_per_s=peak, hbm_bytes_per_s=hbm)
    weights_s = (8192 * 2 + 8192 * 8192 * 2 + 8192 * 2) / (0.8 * hbm)
    assert skinny == pytest.approx(5e-6 + weights_s, rel=1e-12)  # HBM-bound


def _h100_bf16() -> tuple[MatmulFit, float, float]:
    calibration = load_calibration("h100")
    assert calibration is not None
    fit = calibration.matmul_fit("bfloat16")
    assert fit is not None
    chip = load_preset("h100").chip
    return fit, chip.peak_flops_per_s_for("bfloat16"), chip.hbm_bytes_per_s


@pytest.mark.parametrize("dim", ["m", "n", "k"])
def test_tile_aligned_shape_is_never_slower_per_flop(dim: str) -> None:
    fit, peak, hbm = _h100_bf16()
    tile = {"m": fit.tile_m, "n": fit.tile_n, "k": fit.tile_k}[dim]
    base = {"m": 512, "n": 1024, "k": 768}
    for size in [*range(1, 3 * tile + 2, 7), 1000, 4097]:
        aligned = -(-size // tile) * tile
        times = {}
        for value in (size, aligned):
            shape = {**base, dim: value}
            t = matmul_time_s(fit, **shape, peak_flops_per_s=peak, hbm_bytes_per_s=hbm)
            times[value] = t / (2 * shape["m"] * shape["n"] * shape["k"])
        assert times[aligned] <= times[size] * (1 + 1e-12), (dim, size, aligned)


def test_matmul_time_is_monotone_in_every_dimension() -> None:
    fit, peak, hbm = _h100_bf16()
    sizes = [1, 17, 128, 129, 300, 1024, 4096, 12288]
    for dim in ("m", "n", "k", "batch"):
        times = [
            matmul_time_s(
                fit,
                **{"m": 512, "n": 512, "k": 512, "batch": 1, dim: size},
                peak_flops_per_s=peak,
                hbm_bytes_per_s=hbm,
            )
            for size in sizes
        ]
        assert times == sorted(times), dim


def test_launch_floor_bounds_tiny_shapes() -> None:
    fit, peak, hbm = _h100_bf16()
    tiny = matmul_time_s(fit, m=1, n=1, k=1, peak_flops_per_s=peak, hbm_bytes_per_s=hbm)
    one_tile_s = (
        2
        * fit.tile_m
        * fit.tile_n
        * (fit.tile_k + fit.k_overhead_elements)
        / (fit.compute_efficiency * peak)
    )
    assert tiny == pytest.approx(fit.launch_floor_s + one_tile_s, rel=1e-12)
    assert fit.launch_floor_s <= tiny < 1.01 * fit.launch_floor_s
    assert 1e-6 < fit.launch_floor_s < 2e-5  # a kernel launch, not a typo in units


def test_fit_recovers_known_matmul_parameters() -> None:
    truth = (6e-6, 0.8, 0.9, 100.0)
    fit = _fit(
        launch_floor_s=truth[0],
        compute_efficiency=truth[1],
        hbm_efficiency=truth[2],
        k_overhead_elements=truth[3],
    )
    peak, hbm = 1e15, 3e12
    shapes = [
        (b, m, n, k)
        for b in (1, 4)
        for m in (256, 2048)
        for n in (512, 4096)
        for k in (256, 1024, 8192)
    ]
    times = [
        matmul_time_s(fit, m=m, n=n, k=k, batch=b, peak_flops_per_s=peak, hbm_bytes_per_s=hbm)
        for b, m, n, k in shapes
    ]
    rows = MatmulRows(
        batch=np.array([s[0] for s in shapes], dtype=float),
        m=np.array([s[1] for s in shapes], dtype=float),
        n=np.array([s[2] for s in shapes], dtype=float),
        k=np.array([s[3] for s in shapes], dtype=float),
        hbm_bytes=np.array(
            [matmul_bytes(fit, m=m, n=n, k=k, batch=b) for b, m, n, k in shapes], dtype=float
        ),
        time_s=np.array(times),
    )
    result = fit_matmul(rows, peak_flops_per_s=peak, hbm_bytes_per_s=hbm, tile=(128, 128, 64))
    assert result.params == pytest.approx(truth, rel=1e-3)
    assert result.rms_log_error < 1e-6


@pytest.mark.parametrize("preset", ["h100", "b200"])
def test_calibrated_matmul_never_beats_the_datasheet(preset: str) -> None:
    hardware = load_preset(preset)
    calibration = load_calibration(preset)
    assert calibration is not None
    assert calibration.matmul
    for fit in calibration.matmul:
        for m, n, k in [
            (1, 1, 1),
            (16, 8192, 8192),
            (4096, 4096, 4096),
            (8192, 8192, 65536),
            (300, 77, 129),
        ]:
            figure = calibrated_matmul(
                hardware, m=m, n=n, k=k, dtype=fit.lhs_dtype, rhs_dtype=fit.rhs_dtype
            )
            assert figure.calibrated_s is not None, figure.source
            assert figure.calibrated_s >= figure.roofline_s
            assert figure.low_s is not None
            assert figure.high_s is not None
            assert figure.roofline_s <= figure.low_s <= figure.calibrated_s <= figure.high_s
            assert figure.bound_s == figure.roofline_s


# --------------------------------------------------------------------------------------
# Collective formula


def test_collective_time_by_hand() -> None:
    fit = _collective()
    message = 8 * 2**20
    sent = message * 3 / 4  # an AllGather over 4 GPUs: each receives the other 3 quarters
    steps = 3
    pipelined = (math.sqrt(4e-6) + math.sqrt(sent / 100e9)) ** 2
    expected = 10e-6 + steps * 1e-6 + pipelined
    assert collective_time_s(fit, message_bytes=message, group_size=4) == pytest.approx(
        expected, rel=1e-12
    )
    # AllReduce: twice the bytes and twice the ring steps
    reduce = _collective(op=Collective.ALL_REDUCE)
    expected_ar = 10e-6 + 6 * 1e-6 + (math.sqrt(4e-6) + math.sqrt(2 * sent / 100e9)) ** 2
    assert collective_time_s(reduce, message_bytes=message, group_size=4) == pytest.approx(
        expected_ar, rel=1e-12
    )
    assert collective_time_s(fit, message_bytes=message, group_size=1) == 0.0
    assert collective_time_s(fit, message_bytes=0, group_size=4) == 0.0


def test_large_messages_reach_the_bus_bandwidth() -> None:
    fit = _collective(latency_per_step_s=0.0)
    huge = 1e13
    achieved = bus_bytes(fit.op, huge, 4) / collective_time_s(fit, message_bytes=huge, group_size=4)
    assert achieved == pytest.approx(fit.bus_bytes_per_s, rel=2e-3)
    assert achieved < fit.bus_bytes_per_s


@pytest.mark.parametrize("preset", SHIPPED)
def test_collective_time_is_monotone_in_bytes(preset: str) -> None:
    calibration = load_calibration(preset)
    assert calibration is not None
    sizes = [2.0**e for e in range(6, 37)]
    for fit in calibration.collectives:
        group = fit.group_size or max(fit.fitted_group_sizes)
        times = [collective_time_s(fit, message_bytes=v, group_size=group) for v in sizes]
        assert all(b > a for a, b in itertools.pairwise(times)), fit.data_source


@pytest.mark.parametrize("kind", list(Collective))
def test_bus_bytes_are_the_bytes_each_chip_sends(kind: Collective) -> None:
    """``bus_bytes`` (NCCL's convention, from the message) equals collectives.py's
    ``bytes_sent_per_chip`` (from the per-chip input) for the same collective."""
    group, per_chip_in = 8, 4096
    volume = per_chip_in * (group if kind in (Collective.ALL_GATHER, Collective.ALL_TO_ALL) else 1)
    message = message_bytes_of(kind, volume, group)
    expected = bytes_sent_per_chip(kind, per_chip_in, group, 1)
    assert bus_bytes(kind, message, group) == pytest.approx(expected)


def test_ring_steps() -> None:
    assert ring_steps(Collective.ALL_GATHER, 8) == 7
    assert ring_steps(Collective.REDUCE_SCATTER, 8) == 7
    assert ring_steps(Collective.ALL_TO_ALL, 8) == 7
    assert ring_steps(Collective.ALL_REDUCE, 8) == 14
    assert ring_steps(Collective.COLLECTIVE_PERMUTE, 8) == 1
    assert ring_steps(Collective.ALL_REDUCE, 1) == 0


def test_fit_recovers_known_collective_parameters() -> None:
    fit = _collective(latency_per_step_s=0.0, group_size=8, fitted_group_sizes=(8,))
    sizes = np.array([2.0**e for e in range(10, 32)])
    times = np.array([collective_time_s(fit, message_bytes=v, group_size=8) for v in sizes])
    rows = CollectiveRows(
        ops=(Collective.ALL_GATHER,) * sizes.size,
        group_size=np.full(sizes.size, 8.0),
        message_bytes=sizes,
        time_s=times,
    )
    result = fit_collective_bucket(rows, max_bus_bytes_per_s=450e9)
    assert result.params == pytest.approx((10e-6, 4e-6, 100e9), rel=1e-3)


def test_folds_partition_the_rows() -> None:
    masks = fold_masks(12, 5)
    assert len(masks) == 5
    assert np.all(np.sum(masks, axis=0) == 1)
    assert len(fold_masks(3, 5)) == 3


def _mesh_cases() -> list[tuple[str, str, str, tuple[str, ...]]]:
    return [
        ("h100", "x=4,y=2", "1x8", ("y",)),
        ("h100", "x=1,y=8", "1x8", ("y",)),
        ("h100", "x=16,y=8", "16x8", ("x", "y")),
        ("h100", "x=2,y=8", "2x8", ("x",)),
        ("b200", "x=2,y=4", "1x8", ("y",)),
        ("gb200-nvl72", "x=4,y=18", "1x72", ("y",)),
        ("gb200-nvl72", "x=1,y=72", "1x72", ("y",)),
    ]


@pytest.mark.parametrize(("preset", "mesh_text", "topology", "axes"), _mesh_cases())
def test_calibrated_collective_never_beats_the_bandwidth_roofline(
    preset: str, mesh_text: str, topology: str, axes: tuple[str, ...]
) -> None:
    mesh = DeviceMesh.create(load_preset(preset), mesh_text, topology)
    size = math.prod(mesh.axis_size(a) for a in axes)
    for kind in Collective:
        for per_chip in (size, 64 * size, 2**20 * size, 2**8 * 2**20 * size):
            figure = calibrated_collective(
                mesh, kind, axes, elements_in_per_chip=per_chip, dtype="bfloat16"
            )
            cost = collective_cost(mesh, kind, axes, elements_in_per_chip=per_chip, dtype="bf16")
            assert figure.roofline_s == cost.time_s
            assert figure.bound_s == cost.bandwidth_s
            if figure.calibrated_s is None:
                assert "roofline only" in figure.source
                continue
            assert figure.calibrated_s >= cost.bandwidth_s
            assert figure.low_s is not None
            assert figure.high_s is not None
            assert cost.bandwidth_s <= figure.low_s <= figure.calibrated_s <= figure.high_s


def test_collective_lookup_and_its_notes() -> None:
    calibration = load_calibration("h100")
    assert calibration is not None
    found = calibration.collective_fit(Collective.ALL_GATHER, 4, LinkKind.NVLINK)
    assert found is not None
    assert found[0].group_size == 4
    assert found[1] == "fitted on groups of 4"
    found = calibration.collective_fit(Collective.ALL_GATHER, 3, LinkKind.NVLINK)
    assert found is not None
    assert found[0].group_size == 4
    assert "costed as the measured 4" in found[1]
    found = calibration.collective_fit(Collective.ALL_GATHER, 16, LinkKind.NVLINK)
    assert found is not None
    assert "extrapolated" in found[1]
    found = calibration.collective_fit(
        Collective.ALL_GATHER, 512, LinkKind.INFINIBAND, gpus_per_node=8
    )
    assert found is not None
    assert found[0].group_size == 0
    assert "extrapolated to 512" in found[1]
    assert (
        calibration.collective_fit(Collective.ALL_GATHER, 16, LinkKind.INFINIBAND, gpus_per_node=1)
        is None
    )
    assert (
        calibration.collective_fit(Collective.ALL_TO_ALL, 16, LinkKind.INFINIBAND, gpus_per_node=8)
        is None
    )
    ring = calibration.collective_fit(Collective.COLLECTIVE_PERMUTE, 8, LinkKind.NVLINK)
    assert ring is not None
    assert ring[0].permute_pattern == RING_PERMUTE


def test_cross_node_collective_uses_the_infiniband_fit() -> None:
    mesh = DeviceMesh.create(load_preset("h100"), "x=4,y=8", "4x8")
    figure = calibrated_collective(
        mesh, Collective.ALL_GATHER, ("x", "y"), elements_in_per_chip=2**20, dtype="bf16"
    )
    assert figure.is_calibrated
    assert "playbook_collectives.csv" in figure.source
    assert "infiniband" in figure.what
    no_fit = calibrated_collective(
        mesh, Collective.ALL_TO_ALL, ("x", "y"), elements_in_per_chip=2**20, dtype="bf16"
    )
    assert not no_fit.is_calibrated
    assert no_fit.source == "no all-to-all calibration on infiniband for h100: roofline only"
    one_per_node = calibrated_collective(
        mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=2**20, dtype="bf16"
    )
    assert one_per_node.source == (
        "no all-gather calibration on infiniband for h100 groups with 1 GPU per node "
        "(measured: 8 per node): roofline only"
    )


# --------------------------------------------------------------------------------------
# Presets without calibration data


@pytest.mark.parametrize("preset", [p for p in list_presets() if p not in SHIPPED])
def test_presets_without_data_print_the_roofline(preset: str) -> None:
    hardware = load_preset(preset)
    assert load_calibration(preset) is None
    figure = calibrated_matmul(hardware, m=4096, n=4096, k=4096, dtype="bfloat16")
    assert not figure.is_calibrated
    assert figure.source == f"no calibration data for {preset}: roofline only"
    assert figure.time_s == figure.roofline_s
    assert figure.describe().endswith(f"roofline (no calibration data for {preset}: roofline only)")


def test_tpu_collectives_are_roofline_only() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    figure = calibrated_collective(
        mesh, Collective.ALL_GATHER, ("x",), elements_in_per_chip=2**20, dtype="bf16"
    )
    assert figure.source == "no calibration data for tpu-v5e: roofline only"
    assert figure.roofline_s > 0


def test_missing_dtypes_and_gemms_say_so() -> None:
    no_gemms = calibrated_matmul(load_preset("gb200-nvl72"), m=64, n=64, k=64, dtype="bf16")
    assert no_gemms.source == (
        "no matmul calibration for bfloat16 on gb200-nvl72 (calibrated: none): roofline only"
    )
    fp16 = calibrated_matmul(load_preset("h100"), m=64, n=64, k=64, dtype="float16")
    assert fp16.source.startswith("no matmul calibration for float16 on h100 (calibrated: ")
    assert "float32" not in fp16.source  # the TF32-measured f32 rows are not shipped


def test_calibrated_time_refuses_to_beat_the_datasheet() -> None:
    with pytest.raises(ConfigError, match="beats the datasheet bound"):
        CalibratedTime(
            what="x",
            roofline_s=2.0,
            bound_s=2.0,
            calibrated_s=1.0,
            low_s=1.0,
            high_s=1.0,
            source="test",
        )


def test_describe_prints_the_roofline_beside() -> None:
    figure = calibrated_matmul(load_preset("h100"), m=4096, n=4096, k=4096, dtype="bf16")
    text = figure.describe()
    assert " calibrated (" in text
    assert ", roofline " in text
    assert "h100.json" in text
    assert figure.calibrated_s is not None
    flops = 2 * 4096**3
    assert 0.7 * 9.89e14 < flops / figure.calibrated_s < 9.89e14  # the H100 GEMM data: ~800 T
    rate = achieved_matmul_flops_per_s(load_preset("h100"), m=4096, n=4096, k=4096, dtype="bf16")
    assert rate == pytest.approx(flops / figure.calibrated_s)
    assert achieved_matmul_flops_per_s(load_preset("tpu-v5e"), m=8, n=8, k=8, dtype="bf16") is None


def test_gemm_dims_of_an_einsum() -> None:
    einsum = Einsum.create("bmk,bkn->bmn", "b=2,m=300,k=128,n=512")
    assert gemm_dims(einsum) == (2, 300, 512, 128)
    attention = Einsum.create("bhqd,bhkd->bhqk", "b=2,h=4,q=64,k=32,d=16")
    assert gemm_dims(attention) == (8, 64, 32, 16)
    lopsided = Einsum.create("ab,bc->c", "a=3,b=5,c=7")  # a is summed in the lhs alone
    batch, m, n, k = gemm_dims(lopsided)
    assert (batch, m, n, k) == (1, 1, 7, 5)  # a is reduced out of the lhs before the dot
    for example in (einsum, attention, lopsided):
        batch, m, n, k = gemm_dims(example)
        assert 2 * batch * m * n * k == example.dot_flops
    via_einsum = calibrated_einsum(load_preset("h100"), einsum)
    direct = calibrated_matmul(load_preset("h100"), m=300, n=512, k=128, batch=2, dtype="bf16")
    assert via_einsum.calibrated_s == direct.calibrated_s


# --------------------------------------------------------------------------------------
# Files


def test_shipped_calibrations() -> None:
    assert list_calibrations() == list(SHIPPED)
    for name in SHIPPED:
        assert name in list_presets()
        calibration = load_calibration(name)
        assert isinstance(calibration, Calibration)
        assert calibration.preset == name
        assert calibration.source.command == "python benchmarks/calibration.py"
        # only the H100 has Playbook runs to fit the training step and memory on
        assert (calibration.step is not None) == (name == "h100")
        assert (calibration.memory is not None) == (name == "h100")
        for fit in calibration.matmul:
            assert fit.compute_efficiency <= 1
            assert fit.hbm_efficiency <= 1
        nvlink = load_preset(name).nvlink
        assert nvlink is not None
        for cfit in calibration.collectives:
            assert cfit.bus_bytes_per_s <= nvlink.bytes_per_s_per_gpu_per_direction
    h100 = load_calibration("h100")
    assert h100 is not None
    assert {f.name for f in h100.matmul} >= {"bfloat16", "float8_e4m3fn"}


def _shipped_json(name: str = "h100") -> dict[str, object]:
    path = REPO / "src" / "sharding_roofline" / "calibration" / f"{name}.json"
    data: dict[str, object] = json.loads(path.read_text(encoding="utf-8"))
    return data


def _load_modified(tmp_path: Path, data: dict[str, object]) -> Calibration | None:
    path = tmp_path / "h100.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return load_calibration(path)


def test_unknown_top_level_key_is_an_error(tmp_path: Path) -> None:
    data = _shipped_json()
    data["bogus"] = 1
    with pytest.raises(ConfigError, match=r"h100\.json: unknown key 'bogus'; expected one of"):
        _load_modified(tmp_path, data)


def test_unknown_nested_key_names_the_table(tmp_path: Path) -> None:
    data = _shipped_json()
    matmul = data["matmul"]
    assert isinstance(matmul, list)
    matmul[0]["tile_size"] = 128
    with pytest.raises(ConfigError, match=r"h100\.json: \[matmul\[0\]\]: unknown key 'tile_size'"):
        _load_modified(tmp_path, data)


def test_missing_key_and_wrong_type_are_errors(tmp_path: Path) -> None:
    data = _shipped_json()
    collectives = data["collectives"]
    assert isinstance(collectives, list)
    del collectives[0]["bus_bytes_per_s"]
    with pytest.raises(ConfigError, match=r"\[collectives\[0\]\]: missing key 'bus_bytes_per_s'"):
        _load_modified(tmp_path, data)
    data = _shipped_json()
    collectives = data["collectives"]
    assert isinstance(collectives, list)
    collectives[0]["latency_s"] = "20us"
    with pytest.raises(ConfigError, match=r"latency_s: expected a number, got '20us'"):
        _load_modified(tmp_path, data)


def test_an_efficiency_above_one_is_rejected(tmp_path: Path) -> None:
    data = _shipped_json()
    matmul = data["matmul"]
    assert isinstance(matmul, list)
    matmul[0]["compute_efficiency"] = 1.3
    with pytest.raises(
        ConfigError, match=r"compute_efficiency must be a finite number > 0 and <= 1"
    ):
        _load_modified(tmp_path, data)


def test_write_then_load_round_trips(tmp_path: Path) -> None:
    for name in SHIPPED:
        calibration = load_calibration(name)
        assert calibration is not None
        path = tmp_path / f"{name}.json"
        write_calibration(calibration, path)
        again = load_calibration(path)
        assert again == calibration
        assert path.read_text(encoding="utf-8") == (
            REPO / "src" / "sharding_roofline" / "calibration" / f"{name}.json"
        ).read_text(encoding="utf-8")


def test_a_missing_file_is_an_error() -> None:
    with pytest.raises(UnknownNameError, match=r"calibration file 'nope\.json' does not exist"):
        load_calibration("nope.json")


def test_calibration_imports_no_jax() -> None:
    code = (
        "import sys, sharding_roofline.calibration; "
        "sys.exit('jax' in sys.modules or 'scipy' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_large_message_threshold_is_one_mib() -> None:
    assert LARGE_MESSAGE_BYTES == 1 << 20
