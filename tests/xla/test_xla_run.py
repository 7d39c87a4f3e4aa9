"""The two programs of a plan: layouts pinned, every step kind issued, compiled and run."""

from __future__ import annotations

import os

import pytest

jax = pytest.importorskip("jax")

from jax.sharding import NamedSharding  # noqa: E402

from sharding_roofline.einsum import Einsum  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.planner import Planner  # noqa: E402
from sharding_roofline.plans import Plan  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.xla.compare import observed_collectives  # noqa: E402
from sharding_roofline.xla.devices import jax_mesh, named_sharding  # noqa: E402
from sharding_roofline.xla.run import (  # noqa: E402
    capture_stderr,
    compile_plan,
    execute_plan,
    jit_program,
    shard_map_program,
    tolerance,
)

pytestmark = pytest.mark.jax

DIMS = "b=64,d=32,f=128"


def _mesh(spec: str = "x=2,y=4") -> DeviceMesh:
    return DeviceMesh.create(load_preset("tpu-v5e"), spec)


def _plans(lhs: str, rhs: str, out: str | None, **kw: str) -> list[Plan]:
    einsum = Einsum.create("bd,df->bf", DIMS, dtype="bfloat16", accum_dtype="float32")
    planner = Planner(einsum, _mesh(), lhs=lhs, rhs=rhs, out=out, check_memory=False, **kw)
    return list(planner.search(top=None).strategies)


def _with_kinds(plans: list[Plan], kinds: set[str | None]) -> Plan:
    """The first plan whose steps use every kind in ``kinds`` (None: a free slice)."""
    for plan in plans:
        used = {step.kind.value if step.kind else None for step in plan.steps}
        if kinds <= used:
            return plan
    raise AssertionError(f"no plan uses {kinds}")  # pragma: no cover


def test_capture_stderr_reads_file_descriptor_2() -> None:
    with capture_stderr() as lines:
        os.write(2, b"from C: Involuntary full rematerialization\n\n")
    assert lines == ["from C: Involuntary full rematerialization"]


def test_jit_program_pins_stored_layouts_and_output() -> None:
    plan = _plans("x,None", "y,None", "x,None")[0]
    mesh = jax_mesh(plan.mesh)
    fn, args = jit_program(plan, mesh)
    assert [a.sharding for a in args] == [
        named_sharding(mesh, plan.lhs),
        named_sharding(mesh, plan.rhs),
    ]
    compiled = fn.lower(*args).compile()
    (out,) = jax.tree.leaves(compiled.output_shardings)
    assert isinstance(out, NamedSharding)
    assert out.is_equivalent_to(named_sharding(mesh, plan.out), 2)


@pytest.mark.parametrize(
    ("lhs", "rhs", "out", "kinds"),
    [
        pytest.param("x,None", "y,None", "x,None", {"all-gather", None}, id="gather-slice"),
        pytest.param("x,None", "y,None", "x,None", {"all-to-all"}, id="all-to-all"),
        pytest.param("x,y", "y,None", "x,y", {"reduce-scatter"}, id="reduce-scatter"),
        pytest.param("x,y", "y,None", "x,None", {"all-reduce"}, id="all-reduce"),
    ],
)
def test_shard_map_program_issues_exactly_the_plan_steps(
    lhs: str, rhs: str, out: str, kinds: set[str | None]
) -> None:
    plan = _with_kinds(_plans(lhs, rhs, out), kinds)
    fn, args = shard_map_program(plan)
    text = fn.lower(*args).compile().as_text()
    # observed_collectives, not hlo.read_collectives: a shard_map program gives every
    # collective channel_id=1, and read_collectives merges ops sharing a channel id
    got = sorted((r.kind, r.axes) for r in observed_collectives(plan, text))
    assert got == sorted((s.kind.value, s.cost.axes) for s in plan.collectives if s.cost)


def test_compile_plan_caches_by_layout_and_steps() -> None:
    plan = _plans("x,y", "y,None", "x,None")[0]
    first = compile_plan(plan)
    again = compile_plan(plan)
    assert again.compile_s == 0.0
    assert again.jit_text == first.jit_text
    assert again.shard_map_text == first.shard_map_text
    jit_only = compile_plan(plan, with_shard_map=False)
    assert jit_only.shard_map_text is None
    assert jit_only.jit_text == first.jit_text


def test_involuntary_rematerialization_is_reported() -> None:
    # A[B_x, D] · B[D_y, F] -> C[B_x, F] computed as A[B, D] · B[D, F_x]: XLA cannot reshard
    # B from D_y to F_x efficiently and replicates it (jax_notes.md §1.3)
    plans = _plans("x,None", "y,None", "x,None")
    plan = next(p for p in plans if p.operation.rhs.text() == "None,x")
    compiled = compile_plan(plan)
    assert any("Involuntary full rematerialization" in w for w in compiled.warnings)


def test_execute_plan_is_right_and_keeps_the_output_layout() -> None:
    plan = _plans("x,y", "y,None", "x,y")[0]
    result = execute_plan(plan)
    assert result.ok
    assert result.jit_sharding_ok
    assert result.shard_map_sharding_ok
    assert result.max_rel_error <= result.tolerance
    assert result.max_abs_error < 1e-3  # f32 accumulation of bf16 products


def test_tolerance_follows_the_accumulation_dtype() -> None:
    mesh = _mesh()
    f32 = Planner(
        Einsum.create("bd,df->bf", DIMS, dtype="bfloat16", accum_dtype="float32"),
        mesh,
        check_memory=False,
    )
    bf16 = Planner(Einsum.create("bd,df->bf", DIMS, dtype="bfloat16"), mesh, check_memory=False)
    assert tolerance(f32.search(top=1).best) < tolerance(bf16.search(top=1).best)
