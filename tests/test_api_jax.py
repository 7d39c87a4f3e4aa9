"""The planner takes real ``jax.sharding.PartitionSpec`` objects (the core never imports JAX;
it reads them as sequences)."""

from __future__ import annotations

import pytest

from sharding_roofline import DeviceMesh, Einsum, estimate, load_preset


@pytest.mark.jax
def test_partition_spec_objects_work_like_strings() -> None:
    from jax.sharding import PartitionSpec as P  # noqa: PLC0415 (this test is about JAX objects)

    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=2,y=4", "2x4")
    mm = Einsum.create("bd,df->bf", "b=1024,d=2048,f=4096")
    from_objects = estimate(mm, mesh, lhs=P("x", None), rhs=P(None, "y"), out=P("x", "y"))
    from_strings = estimate(mm, mesh, lhs="x,None", rhs="None,y", out="x,y")
    assert from_objects.strategy == from_strings.strategy
    assert from_objects.cost == from_strings.cost
    multi = estimate(mm, mesh, lhs=P(("x", "y"), None), rhs=P(), out=P(("x", "y")))
    assert multi.lhs.text() == "x+y,None"
    assert multi.rhs.text() == "None,None"
    assert multi.collectives == ()
