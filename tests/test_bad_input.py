"""Bad input found by fuzzing the Python API: each is refused with one of our errors that
names the value, what was expected and the fix, never an AttributeError or a wrong answer."""

from __future__ import annotations

import dataclasses
import math

import pytest

from sharding_roofline import (
    Collective,
    DeviceMesh,
    Einsum,
    EinsumSpec,
    Planner,
    ShardingRooflineError,
    ShardingSpec,
    SpecError,
    TopologyError,
    collective_cost,
    load_preset,
)
from sharding_roofline.errors import ConfigError, UnknownNameError
from sharding_roofline.hardware import ChipSpec
from sharding_roofline.mesh import MeshAxis, parse_mesh_axes
from sharding_roofline.sharding import parse_array_shape
from sharding_roofline.topology import Topology, parse_shape

V5E = load_preset("tpu-v5e")


def _mesh() -> DeviceMesh:
    return DeviceMesh.create(V5E, "x=2,y=4", "2x4")


# -- mesh axes -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["_", "none", "None", "NONE"])
def test_mesh_axis_named_like_replicated_is_refused(name: str) -> None:
    """A spec reads these as "replicated", so a split over such an axis would vanish."""
    with pytest.raises(TopologyError, match="reads it as 'replicated'"):
        DeviceMesh.create(V5E, [(name, 2), ("y", 4)], "2x4")


def test_mesh_text_axis_named_underscore_is_refused() -> None:
    with pytest.raises(TopologyError, match=r"'_' cannot name a mesh axis"):
        parse_mesh_axes("_=2,y=4")


@pytest.mark.parametrize(
    ("axes", "message"),
    [
        pytest.param([("x", -2), ("y", -4)], r"size = -2 is outside 1", id="negative"),
        pytest.param([("x", 4.5), ("y", 2)], r"must be a whole number, got 4.5", id="float"),
        pytest.param([("x", 2), ("x", 4)], r"'x' is named twice", id="duplicate"),
        pytest.param([("x", True), ("y", 8)], r"whole number, got True", id="bool"),
        pytest.param([("x", "2"), ("y", 4)], r"whole number, got '2'", id="string-size"),
        pytest.param(["x2"], r"\(name, size\) pairs", id="not-pairs"),
    ],
)
def test_mesh_sizes_from_code_are_validated(axes: list[object], message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        DeviceMesh.create(V5E, axes, "2x4")  # type: ignore[arg-type]


@pytest.mark.parametrize("text", ["x=²", "x=٣", "x=-2", "x=2.5", "x=1e3"])
def test_mesh_sizes_are_ascii_whole_numbers(text: str) -> None:
    with pytest.raises(TopologyError, match="is not NAME=SIZE"):
        parse_mesh_axes(text)


def test_mesh_with_too_many_axes_is_refused_before_planning() -> None:
    """An 8-axis mesh took 183 s and 3.2 GB in plan: the searches take at most 6 axes of
    size > 1 (a model plan's own fine meshes, evaluated without a search, take more)."""
    mesh_text = ",".join(f"a{i}=2" for i in range(8))
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), mesh_text, "4x8x8")
    einsum = Einsum.create("bd,df->bf", "b=256,d=256,f=256")
    with pytest.raises(TopologyError, match=r"8 axes of size > 1, more than the 6 .* Merge"):
        Planner(einsum, mesh)
    ok = ",".join(f"a{i}=2" for i in range(6)) + ",one=1"
    Planner(einsum, DeviceMesh.create(load_preset("tpu-v5p"), ok, "4x4x4"))


def test_mesh_axes_given_as_a_string_are_refused_not_split_into_letters() -> None:
    with pytest.raises(TopologyError, match="sequence of names"):
        _mesh().ordered("xy")


def test_mesh_create_needs_hardware() -> None:
    with pytest.raises(TopologyError, match="needs a HardwareSpec"):
        DeviceMesh.create("tpu-v5e", "x=8")  # type: ignore[arg-type]


def test_mesh_axis_checks_itself() -> None:
    with pytest.raises(TopologyError, match="whole number"):
        MeshAxis(name="x", size=4.5)  # type: ignore[arg-type]


# -- topologies ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        pytest.param("４x4", "is not a shape", id="fullwidth-digit"),
        pytest.param("1" * 400 + "x4", "digits", id="400-digits"),
        pytest.param("2x2x2x2x2x2x2x2x2", "at most 8", id="nine-dims"),
    ],
)
def test_topology_text_is_validated(shape: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        parse_shape(shape)


@pytest.mark.parametrize("shape", [(2.5, 4), (0, 4), ("2", 4), ()])
def test_topology_shape_from_code_is_validated(shape: tuple[object, ...]) -> None:
    with pytest.raises(TopologyError):
        Topology.build(V5E, shape)  # type: ignore[arg-type]


def test_num_slices_must_be_a_whole_number() -> None:
    with pytest.raises(TopologyError, match="num_slices"):
        Topology.build(V5E, "4x4", num_slices=2.5)  # type: ignore[arg-type]


# -- collectives -----------------------------------------------------------------------------


def test_collective_kind_by_name_is_costed_as_that_op() -> None:
    """``collective_cost(mesh, "all-reduce", ...)`` was costed as an all-gather."""
    mesh = _mesh()
    by_name = collective_cost(mesh, "all-reduce", ("y",), elements_in_per_chip=1024, dtype="bf16")
    by_enum = collective_cost(
        mesh, Collective.ALL_REDUCE, ("y",), elements_in_per_chip=1024, dtype="bf16"
    )
    assert by_name == by_enum
    assert by_name.kind is Collective.ALL_REDUCE


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"elements_in_per_chip": math.nan}, "whole number, got nan", id="nan"),
        pytest.param({"elements_in_per_chip": -5}, "outside 0", id="negative"),
        pytest.param({"elements_in_per_chip": 2.0}, "whole number", id="float"),
        pytest.param({"kind": "all-gatherer"}, "unknown collective", id="bad-kind"),
        pytest.param({"kind": 3}, "a Collective or a name", id="int-kind"),
        pytest.param({"dtype": 16}, "a dtype is a name", id="int-dtype"),
        pytest.param({"mesh": "tpu-v5e"}, "needs a DeviceMesh", id="no-mesh"),
    ],
)
def test_collective_cost_validates_its_inputs(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "mesh": _mesh(),
        "kind": Collective.ALL_GATHER,
        "axes": ("y",),
        "elements_in_per_chip": 1024,
        "dtype": "bf16",
    }
    args.update(kwargs)
    with pytest.raises(ShardingRooflineError, match=message):
        collective_cost(
            args["mesh"],  # type: ignore[arg-type]
            args["kind"],  # type: ignore[arg-type]
            args["axes"],  # type: ignore[arg-type]
            elements_in_per_chip=args["elements_in_per_chip"],  # type: ignore[arg-type]
            dtype=args["dtype"],  # type: ignore[arg-type]
        )


def test_collective_axes_as_text() -> None:
    mesh = _mesh()
    text = collective_cost(mesh, "all-gather", "x,y", elements_in_per_chip=8, dtype="bf16")
    seq = collective_cost(mesh, "all-gather", ("x", "y"), elements_in_per_chip=8, dtype="bf16")
    assert text == seq


# -- einsums and shardings -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("equation", "message"),
    [
        pytest.param(",ij->ij", r"the lhs operand is empty", id="empty-lhs"),
        pytest.param("ij,jk→ik", r"einsum 'ij,jk→ik' contains '→' \(write the arrow", id="arrow"),
        pytest.param("bd,df-", r"ends in '-': the shell read '>' as a redirect", id="shell-ate"),
        pytest.param("bd,df->b->f", r"more than one '->'", id="two-arrows"),
        pytest.param(42, r"an einsum is a string", id="not-text"),
    ],
)
def test_einsum_errors_echo_what_was_typed(equation: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        EinsumSpec.parse(equation)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("dims", "message"),
    [
        pytest.param("b=²,d=8,f=8", "is not LETTER=SIZE", id="superscript"),
        pytest.param("b=" + "9" * 300 + ",d=8,f=8", "digits", id="10^300"),
        pytest.param({"b": 2**41, "d": 8, "f": 8}, "outside 1 to", id="too-large"),
        pytest.param({"b": 4.5, "d": 8, "f": 8}, "whole number", id="float"),
        pytest.param({"b": math.nan, "d": 8, "f": 8}, "whole number", id="nan"),
        pytest.param(8, "mapping", id="not-a-mapping"),
    ],
)
def test_einsum_sizes_are_validated(dims: object, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        Einsum.create("bd,df->bf", dims)  # type: ignore[arg-type]


def test_einsum_operand_elements_are_bounded() -> None:
    with pytest.raises(SpecError, match="2\\*\\*62"):
        Einsum.create("abc,c->a", {"a": 2**40, "b": 2**30, "c": 2})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("64,-64", "is not a whole number", id="negative"),
        pytest.param(",".join(["1"] * 20), "20 dimensions; give at most 8", id="20-dims"),
        pytest.param("2048,8192", None, id="ok-commas"),
        pytest.param("2048x8192", None, id="ok-x"),
    ],
)
def test_array_shapes_are_validated(text: str, message: str | None) -> None:
    if message is None:
        assert parse_array_shape(text) == (2048, 8192)
        return
    with pytest.raises(SpecError, match=message):
        parse_array_shape(text)


def test_sharding_spec_built_in_code_is_validated() -> None:
    with pytest.raises(SpecError, match="tuple of tuples of axis names"):
        ShardingSpec((("x",), "y"))  # type: ignore[arg-type]


# -- hardware --------------------------------------------------------------------------------


def _chip(**changes: object) -> ChipSpec:
    base: dict[str, object] = {
        "name": "c",
        "peak_flops_per_s": {"bfloat16": 1e14},
        "hbm_bytes_per_s": 1e12,
        "hbm_capacity_bytes": 1e10,
        "source": "test",
    }
    base.update(changes)
    return ChipSpec(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"peak_flops_per_s": {"bfloat16": 5e-324}}, "outside the physical", id="tiny"),
        pytest.param({"peak_flops_per_s": {"bfloat16": math.inf}}, "finite", id="inf"),
        pytest.param({"hbm_bytes_per_s": 1.7e308}, "outside the physical", id="huge-bw"),
        pytest.param({"hbm_bytes_per_s": 1.0}, "outside the physical", id="1-B/s"),
        pytest.param({"hbm_capacity_bytes": 16}, "outside the physical", id="16-bytes"),
        pytest.param({"peak_flops_per_s": [1e14]}, "must map dtype names", id="list"),
        pytest.param({"source": None}, "source must be text", id="no-source"),
    ],
)
def test_chip_numbers_are_physical(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _chip(**changes)


def test_a_link_too_slow_to_cost_is_refused() -> None:
    """A link bandwidth so small that times underflowed to 0 s (or 1.7e308: division by 0)."""
    assert V5E.ici is not None
    for bad in (1e-300, 1.7e308):
        with pytest.raises(ConfigError, match="link_bytes_per_s_per_direction"):
            dataclasses.replace(V5E.ici, link_bytes_per_s_per_direction=bad)


def test_unknown_dtype_type_is_our_error() -> None:
    with pytest.raises(UnknownNameError):
        _chip().peak_flops_per_s_for(None)  # type: ignore[arg-type]
