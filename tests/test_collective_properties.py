"""Properties every collective cost must have, on every kind of link."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharding_roofline import Collective, DeviceMesh, HardwareSpec, collective_cost, load_preset
from sharding_roofline.hardware import Wraparound

MESHES = [
    ("tpu-v5e", "4x4", "x=4,y=4"),
    ("tpu-v5e", "8x16", "x=8,y=16"),
    ("tpu-v5e", "16x16", "x=2,y=8,z=16"),
    ("tpu-v5p", "4x4x8", "x=4,y=4,z=8"),
    ("tpu-v5p", "2x2x4", "x=2,y=8"),
    ("tpu-v4p", "4x4x4", "a=16,b=4"),
    ("h100", "1x8", "x=2,y=4"),
    ("h100", "4x8", "dp=4,tp=8"),
    ("h100", "64x8", "x=8,y=8,z=8"),
    ("b200", "2x8", "x=16"),
    ("gb200-nvl72", "2x72", "x=2,y=72"),
]


@st.composite
def collective_case(draw: st.DrawFn) -> Case:
    hardware, topology, mesh_text = draw(st.sampled_from(MESHES))
    names = [part.split("=")[0] for part in mesh_text.split(",")]
    axes = tuple(
        draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    )
    kind = draw(st.sampled_from(list(Collective)))
    elements = draw(st.integers(1, 2**24)) * 128 * 72  # divisible by every group size here
    return hardware, topology, mesh_text, kind, axes, elements


Case = tuple[str, str, str, Collective, tuple[str, ...], int]


def _cost(hardware: HardwareSpec, case: Case, elements: int | None = None) -> float:
    _, topology, mesh_text, kind, axes, default = case
    m = DeviceMesh.create(hardware, mesh_text, topology)
    count = default if elements is None else elements
    return collective_cost(m, kind, axes, elements_in_per_chip=count, dtype="bf16").time_s


@given(collective_case())
def test_a_size_one_axis_costs_exactly_nothing(
    case: Case,
) -> None:
    hardware, topology, mesh_text, kind, _, elements = case
    mesh = DeviceMesh.create(load_preset(hardware), f"one=1,{mesh_text}", topology)
    cost = collective_cost(mesh, kind, ("one",), elements_in_per_chip=elements, dtype="bf16")
    assert cost.time_s == 0.0
    assert cost.bytes_sent_per_chip == 0.0


@given(collective_case())
def test_allreduce_is_reduce_scatter_then_allgather(
    case: Case,
) -> None:
    hardware, topology, mesh_text, _, axes, elements = case
    mesh = DeviceMesh.create(load_preset(hardware), mesh_text, topology)
    ar = collective_cost(
        mesh, Collective.ALL_REDUCE, axes, elements_in_per_chip=elements, dtype="bf16"
    )
    rs = collective_cost(
        mesh, Collective.REDUCE_SCATTER, axes, elements_in_per_chip=elements, dtype="bf16"
    )
    ag = collective_cost(
        mesh,
        Collective.ALL_GATHER,
        axes,
        elements_in_per_chip=rs.elements_out_per_chip,
        dtype="bf16",
    )
    # NCCL (GPU links) pays its ring base latency once per collective, not once per half
    gpu = mesh.hardware.nvlink is not None and ar.group_size > 1
    base_s = mesh.hardware.nvlink.ring_base_latency_s if gpu and mesh.hardware.nvlink else 0.0
    assert ar.time_s == pytest.approx(rs.time_s + ag.time_s - base_s, rel=1e-12)
    assert ar.bandwidth_s == pytest.approx(rs.bandwidth_s + ag.bandwidth_s, rel=1e-12)
    assert ar.bytes_sent_per_chip == pytest.approx(rs.bytes_sent_per_chip + ag.bytes_sent_per_chip)


def _scaled(spec: HardwareSpec, factor: float) -> HardwareSpec:
    ici = spec.ici and dataclasses.replace(
        spec.ici, link_bytes_per_s_per_direction=spec.ici.link_bytes_per_s_per_direction * factor
    )
    nvlink = spec.nvlink and dataclasses.replace(
        spec.nvlink,
        bytes_per_s_per_gpu_per_direction=spec.nvlink.bytes_per_s_per_gpu_per_direction * factor,
    )
    levels = tuple(
        dataclasses.replace(
            level,
            bytes_per_s_per_chip_per_direction=level.bytes_per_s_per_chip_per_direction * factor,
        )
        for level in spec.scale_out
    )
    return dataclasses.replace(spec, ici=ici, nvlink=nvlink, scale_out=levels)


@given(collective_case(), st.floats(1.0, 100.0))
def test_more_bandwidth_never_costs_more(case: Case, factor: float) -> None:
    hardware = case[0]
    base = load_preset(hardware)
    slow = _cost(base, case)
    fast = _cost(_scaled(base, factor), case)
    assert fast <= slow * (1 + 1e-12)


@given(collective_case())
def test_losing_wraparound_never_helps(
    case: Case,
) -> None:
    hardware = case[0]
    base = load_preset(hardware)
    if base.ici is None:
        return  # switched links have no wraparound
    ring = dataclasses.replace(
        base, ici=dataclasses.replace(base.ici, wraparound=Wraparound.ALWAYS)
    )
    line = dataclasses.replace(base, ici=dataclasses.replace(base.ici, wraparound=Wraparound.NEVER))
    assert _cost(ring, case) <= _cost(line, case) * (1 + 1e-12)


@given(collective_case(), st.integers(2, 16))
def test_more_bytes_never_take_less_time(case: Case, factor: int) -> None:
    hardware = case[0]
    spec = load_preset(hardware)
    assert _cost(spec, case) <= _cost(spec, case, case[5] * factor)
