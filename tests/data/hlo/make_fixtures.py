"""Regenerate the compiled-HLO fixtures in this folder (real ``compiled.as_text()`` output).

Run with the pinned JAX (0.10.2) on simulated CPU devices; nothing executes, every case only
compiles (about 0.1 s each)::

    python tests/data/hlo/make_fixtures.py

Each ``<case>.txt`` is the untouched per-device program of one jitted function on an
Auto-axes mesh: ``(2, 4)`` named ``('x', 'y')`` over the first 8 of 16 simulated devices,
or ``(4, 4)`` over all 16. The tests in ``tests/xla/test_hlo.py`` read them without JAX.
The ``hand_*.txt`` files are hand-written (forms the CPU backend never prints: async
``-start``/``-done`` ops, TPU tiled layouts, the TPU ``%all-reduce-scatter`` fusion) and are
not touched by this script.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

jax.config.update("jax_num_cpu_devices", 16)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import AxisType, Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

HERE = Path(__file__).resolve().parent
M, K, N = 256, 512, 1024  # the jax_notes.md section 3.1 matmul: A[M, K] @ B[K, N]

AUTO2 = (AxisType.Auto, AxisType.Auto)
MESH_2X4 = jax.make_mesh((2, 4), ("x", "y"), axis_types=AUTO2, devices=jax.devices()[:8])
MESH_4X4 = jax.make_mesh((4, 4), ("x", "y"), axis_types=AUTO2, devices=jax.devices()[:16])
# The same 2x4 mesh with its devices in another order: HLO replica groups number the
# *positions* in the mesh (partition ids), so this prints exactly what MESH_2X4 prints.
MESH_2X4_PERMUTED = Mesh(
    np.array(jax.devices()[:8])[[3, 1, 0, 2, 7, 5, 4, 6]].reshape(2, 4),
    ("x", "y"),
    axis_types=AUTO2,
)

wsc = jax.lax.with_sharding_constraint


def sharding(mesh: Mesh, *spec: Any) -> NamedSharding:
    return NamedSharding(mesh, P(*spec))


def arg(shape: tuple[int, ...], dtype: Any, *spec: Any, mesh: Mesh = MESH_2X4) -> Any:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding(mesh, *spec))


def plain(shape: tuple[int, ...], dtype: Any) -> Any:
    """An unsharded argument: the program compiles for one device."""
    return jax.ShapeDtypeStruct(shape, dtype)


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return a @ b


def two_matmuls(a: jax.Array, b: jax.Array, c: jax.Array) -> tuple[jax.Array, jax.Array]:
    return a @ b, a @ c


def scan_layers(x: jax.Array, w: jax.Array) -> jax.Array:
    """6 layers, each a K-sharded matmul whose output is pinned back to P('x', None)."""

    def layer(carry: jax.Array, w_i: jax.Array) -> tuple[jax.Array, None]:
        return wsc(carry @ w_i, sharding(MESH_2X4, "x", None)), None

    return jax.lax.scan(layer, x, w)[0]


def nested_scan_layers(x: jax.Array, w: jax.Array) -> jax.Array:
    """3 outer x 4 inner layers: the collective runs 12 times."""

    def layer(carry: jax.Array, w_i: jax.Array) -> tuple[jax.Array, None]:
        return wsc(carry @ w_i, sharding(MESH_2X4, "x", None)), None

    def block(carry: jax.Array, w_block: jax.Array) -> tuple[jax.Array, None]:
        return jax.lax.scan(layer, carry, w_block)[0], None

    return jax.lax.scan(block, x, w)[0]


def scan_psum_shard_map(w: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """A shard_map program: a psum over y in a 3-trip scan's body and one in the entry
    (both print channel_id=1: two ops, not copies of one)."""

    def body(w: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        def step(c: jax.Array, wi: jax.Array) -> tuple[jax.Array, None]:
            return c + jax.lax.psum(wi, "y"), None

        c, _ = jax.lax.scan(step, jnp.zeros(w.shape[1:], w.dtype), w)
        return c, jax.lax.psum(v, "y")

    mapped = jax.shard_map(
        body, mesh=MESH_2X4, in_specs=(P(), P()), out_specs=(P(), P()), check_vma=False
    )
    return mapped(w, v)  # type: ignore[no-any-return]


def scan_reduce_scatter(a: jax.Array, b: jax.Array) -> jax.Array:
    """3 layers, each a K-sharded matmul whose result is pinned split over y and stacked:
    the body's all-reduce is sliced by the fusion that writes the scan's output."""

    def step(c: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        ai, bi = xs
        return c, wsc(ai @ bi, sharding(MESH_2X4, "y", None))

    _, ys = jax.lax.scan(step, jnp.zeros(()), (a, b))
    return ys


def batched_einsum(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.einsum("bmk,kn->bmn", a, b)


def cond_matmul(p: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    """Branch 0 (p <= 0): tanh(x); branch 1: x @ w."""
    return jax.lax.cond(p > 0, lambda v: v @ w, jnp.tanh, x)


def conv_same(x: jax.Array, k: jax.Array) -> jax.Array:
    dims = ("NHWC", "HWIO", "NHWC")
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dims)
    return jax.lax.conv_general_dilated(
        y, jnp.transpose(k, (0, 1, 3, 2)), (2, 2), "VALID", dimension_numbers=dims
    )


def cholesky(a: jax.Array) -> jax.Array:
    return jnp.linalg.cholesky(a @ a.T + 64.0 * jnp.eye(a.shape[0], dtype=a.dtype))


def fori_dynamic(n: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    """A loop whose trip count is only known at run time (no known_trip_count)."""
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x)


def mlp(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    return jax.nn.relu(x @ w1) @ w2


def preferred_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    """A K-sharded bf16 matmul accumulated and all-reduced in f32, then rounded to bf16."""
    return jnp.matmul(a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


bf16, f32 = jnp.bfloat16, jnp.float32
S2, S4, SP = MESH_2X4, MESH_4X4, MESH_2X4_PERMUTED

# name -> (function, args, out_shardings); names say the case and the dtype.
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], Any]] = {
    # jax_notes.md section 3.1, A[256,512] @ B[512,1024] on 2x4.
    "a_no_comm_bf16": (
        matmul,
        (arg((M, K), bf16, "x", None), arg((K, N), bf16, None, "y")),
        sharding(S2, "x", "y"),
    ),
    "b_all_gather_mesh_bf16": (
        matmul,
        (arg((M, K), bf16, None, "y"), arg((K, N), bf16, None, None)),
        sharding(S2),
    ),
    "c1_all_reduce_f32": (
        matmul,
        (arg((M, K), f32, "x", "y"), arg((K, N), f32, "y", None)),
        sharding(S2, "x", None),
    ),
    "c2_reduce_scatter_bf16": (
        matmul,
        (arg((M, K), bf16, "x", "y"), arg((K, N), bf16, "y", None)),
        sharding(S2, "x", "y"),
    ),
    "e_permute_all_gather_bf16": (
        matmul,
        (arg((M, K), bf16, "x", None), arg((K, N), bf16, None, "x")),
        None,
    ),
    "f2_all_gather_all8_f32": (
        matmul,
        (arg((M, K), f32, "x", None), arg((K, N), f32, ("x", "y"), None)),
        sharding(S2, "x", None),
    ),
    # Over x instead of y: the transposed iota and size-2 mesh-axes forms.
    "reduce_scatter_x_f32": (
        matmul,
        (arg((M, K), f32, "y", "x"), arg((K, N), f32, "x", None)),
        sharding(S2, "y", "x"),
    ),
    "all_gather_x_f32": (
        matmul,
        (arg((M, K), f32, None, "x"), arg((K, N), f32, None, None)),
        sharding(S2),
    ),
    # Other collectives and printed forms (jax_notes.md section 3.2).
    "all_to_all_bf16": (
        lambda a: wsc(a, sharding(S2, None, "y")),
        (arg((M, K), bf16, "y", None),),
        None,
    ),
    "combined_all_reduce_f32": (
        two_matmuls,
        (arg((M, K), f32, None, "y"), arg((K, K), f32, "y", None), arg((K, M), f32, "y", None)),
        (sharding(S2), sharding(S2)),
    ),
    "combined_mixed_f32": (
        two_matmuls,
        (arg((M, K), f32, None, "y"), arg((K, K), f32, "y", None), arg((K, M), f32, "y", None)),
        (sharding(S2, None, "y"), sharding(S2)),
    ),
    "scan_f32": (
        scan_layers,
        (arg((M, K), f32, "x", "y"), arg((6, K, K), f32, None, "y", None)),
        sharding(S2, "x", None),
    ),
    "nested_scan_f32": (
        nested_scan_layers,
        (arg((M, K), f32, "x", "y"), arg((3, 4, K, K), f32, None, None, "y", None)),
        sharding(S2, "x", None),
    ),
    "einsum_batch_f32": (
        batched_einsum,
        (arg((4, M, K), f32, "x", None, "y"), arg((K, M), f32, "y", None)),
        sharding(S2, "x", None, "y"),
    ),
    # A[-, (x,y)] @ B[x, y] -> C[-, x]: XLA gathers over sub-axes of y ({0,1},... and
    # {0,2},...), printed as [4,2]<=[8] and the 3-D transposed iota [4,2]<=[2,2,2]T(0,2,1).
    "sub_axis_all_gathers_bf16": (
        matmul,
        (arg((M, K), bf16, None, ("x", "y")), arg((K, M), bf16, "x", "y")),
        sharding(S2, None, "x"),
    ),
    "mesh4x4_all_reduce_yx_f32": (
        matmul,
        (arg((M, K), f32, None, ("y", "x"), mesh=S4), arg((K, M), f32, None, None, mesh=S4)),
        sharding(S4),
    ),
    "permuted_mesh_all_gather_bf16": (
        matmul,
        (arg((M, K), bf16, None, "y", mesh=SP), arg((K, N), bf16, None, None, mesh=SP)),
        sharding(SP),
    ),
    # Forms for the walk (tests/xla/test_hlo_walk.py); single-device unless sharded.
    "cond_f32": (
        cond_matmul,
        (jax.ShapeDtypeStruct((), jnp.int32), plain((64, 128), f32), plain((128, 128), f32)),
        None,
    ),
    "conv_f32": (conv_same, (plain((2, 16, 16, 8), f32), plain((3, 3, 8, 16), f32)), None),
    "custom_call_f32": (cholesky, (plain((64, 64), f32),), None),
    "fori_dynamic_f32": (
        fori_dynamic,
        (jax.ShapeDtypeStruct((), jnp.int32), plain((64, 128), f32), plain((128, 128), f32)),
        None,
    ),
    "mlp_bf16": (
        mlp,
        (
            arg((64, 256), bf16, "x", None),
            arg((256, 512), bf16, None, "y"),
            arg((512, 256), bf16, "y", None),
        ),
        sharding(S2, "x", None),
    ),
    "scan_psum_shard_map_f32": (
        scan_psum_shard_map,
        (plain((3, 4), f32), plain((8,), f32)),
        None,
    ),
    "scan_reduce_scatter_f32": (
        scan_reduce_scatter,
        (arg((3, 8, 16), f32, None, None, "y"), arg((3, 16, 4), f32, None, "y", None)),
        sharding(MESH_2X4, None, "y", None),
    ),
    "preferred_f32_bf16": (
        preferred_f32,
        (arg((M, K), bf16, "x", "y"), arg((K, N), bf16, "y", None)),
        sharding(S2, "x", None),
    ),
}

#: Compile options by case (the model validator's shard_map programs disable XLA's moving
#: of all-reduces out of loops, which would merge a scan's per-layer reductions into one).
OPTIONS: dict[str, dict[str, Any]] = {
    "scan_psum_shard_map_f32": {
        "xla_backend_optimization_level": 0,
        "xla_cpu_use_fusion_emitters": False,
        "xla_disable_hlo_passes": "while-loop-all-reduce-code-motion",
    },
    "scan_reduce_scatter_f32": {
        "xla_backend_optimization_level": 0,
        "xla_cpu_use_fusion_emitters": False,
    },
}

#: Cases whose module after spmd-partitioning (logical types) is saved too, as
#: ``<case>.spmd.txt``.
SPMD_DUMPS = ("mlp_bf16", "preferred_f32_bf16")


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    for name in names:
        fn, args, out = CASES[name]
        lowered = jax.jit(fn, out_shardings=out).lower(*args)
        with tempfile.TemporaryDirectory() as dump:
            options = {
                "xla_dump_to": dump,
                "xla_dump_hlo_pass_re": "spmd-partitioning",
                **OPTIONS.get(name, {}),
            }
            text = lowered.compile(compiler_options=options).as_text()
            spmd = sorted(Path(dump).glob("*after_spmd-partitioning*.txt"))
            if name in SPMD_DUMPS and spmd:
                (HERE / f"{name}.spmd.txt").write_text(spmd[-1].read_text())
        path = HERE / f"{name}.txt"
        path.write_text(text)
        print(f"{path.name}: {len(text)} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
