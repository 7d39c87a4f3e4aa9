"""The corpus of JAX programs that tests/xla/test_estimate_fn.py estimates.

Each :class:`Program` carries its matmul FLOPs per chip written out from the shapes
(``2·prod`` per dot, the book's rule), how many times a loop repeats its body (the factor
by which ``cost_analysis()`` and ``jax.experimental.roofline`` undercount), and whether it is
an unrolled single-device f32 program (where those two count right, so we compare with
them). Sizes are small: everything compiles in well under a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

f32, bf16 = jnp.float32, jnp.bfloat16
S = jax.ShapeDtypeStruct
wsc = jax.lax.with_sharding_constraint


def dot(m: int, k: int, n: int) -> int:
    return 2 * m * k * n


@dataclass(frozen=True)
class Program:
    id: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    flops: int  # matmul FLOPs per chip per step, from the shapes
    mesh: str = "x=1"
    in_shardings: tuple[Any, ...] | None = None
    out_shardings: Any = None
    loop_factor: int = 1  # body repetitions XLA's cost_analysis / roofline count once
    compare_xla: bool = False  # unrolled, one device, f32: XLA's counts are right
    static: bool = True  # the trip counts are all known at compile time
    roofline_right: bool = True  # jax.experimental.roofline counts this program's dots


# -- building blocks ---------------------------------------------------------------------------


def matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return a @ b


def mlp(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    return jax.nn.relu(x @ w1) @ w2


def gated_mlp(x: jax.Array, wg: jax.Array, wu: jax.Array, wd: jax.Array) -> jax.Array:
    return (jax.nn.silu(x @ wg) * (x @ wu)) @ wd


def attention(x: jax.Array, wq: jax.Array, wk: jax.Array, wv: jax.Array, wo: jax.Array) -> Any:
    q = jnp.einsum("btd,dhk->bthk", x, wq)
    k = jnp.einsum("btd,dhk->bthk", x, wk)
    v = jnp.einsum("btd,dhk->bthk", x, wv)
    s = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(q.shape[-1]).astype(x.dtype)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhts,bshk->bthk", p, v)
    return jnp.einsum("bthk,hkd->btd", o, wo)


def attention_flops(b: int, t: int, d: int, h: int, k: int) -> int:
    """Per chip with b batch rows and h heads local: q, k, v and out projections, scores
    and the weighted sum of values."""
    return 4 * 2 * b * t * d * h * k + 2 * (2 * b * h * t * t * k)


def scan_layers(x: jax.Array, ws: jax.Array) -> jax.Array:
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0]


def unrolled_layers(x: jax.Array, ws: jax.Array) -> jax.Array:
    for i in range(ws.shape[0]):
        x = jnp.tanh(x @ ws[i])
    return x


def nested_scans(x: jax.Array, ws: jax.Array) -> jax.Array:
    def block(h: jax.Array, w_block: jax.Array) -> tuple[jax.Array, None]:
        return scan_layers(h, w_block), None

    return jax.lax.scan(block, x, ws)[0]


def fori(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.fori_loop(0, 5, lambda i, h: jnp.tanh(h @ w), x)


def fori_in_scan(x: jax.Array, ws: jax.Array) -> jax.Array:
    def layer(h: jax.Array, w: jax.Array) -> tuple[jax.Array, None]:
        return jax.lax.fori_loop(0, 3, lambda i, v: jnp.tanh(v @ w), h), None

    return jax.lax.scan(layer, x, ws)[0]


def dynamic_while(n: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.fori_loop(0, n, lambda i, h: jnp.tanh(h @ w), x)


def sq_loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    def loss(*args: jax.Array) -> jax.Array:
        return jnp.mean(fn(*args).astype(f32) ** 2)

    return loss


def grad_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array) -> Any:
    return jax.value_and_grad(sq_loss(mlp), argnums=(1, 2))(x, w1, w2)


def remat_mlp(x: jax.Array, w1: jax.Array, w2: jax.Array) -> Any:
    return jax.value_and_grad(sq_loss(jax.checkpoint(mlp)), argnums=(1, 2))(x, w1, w2)


def grad_scan(x: jax.Array, ws: jax.Array) -> Any:
    return jax.value_and_grad(sq_loss(scan_layers), argnums=1)(x, ws)


def remat_scan(x: jax.Array, ws: jax.Array) -> Any:
    def layers(x: jax.Array, ws: jax.Array) -> jax.Array:
        step = jax.checkpoint(lambda h, w: (jnp.tanh(h @ w), None))
        return jax.lax.scan(step, x, ws)[0]

    return jax.value_and_grad(sq_loss(layers), argnums=1)(x, ws)


def cond(p: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.cond(p > 0, lambda v: v @ w, jnp.tanh, x)


def switch(i: jax.Array, x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.switch(i, [jnp.tanh, lambda v: v @ w, lambda v: (v @ w) @ w], x)


def conv_same(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_strided(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, k, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def depthwise(x: jax.Array, k: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x,
        k,
        (1, 1),
        "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def grad_conv(x: jax.Array, k: jax.Array) -> Any:
    return jax.grad(sq_loss(conv_strided), argnums=1)(x, k)


def cholesky(a: jax.Array) -> jax.Array:
    return jnp.linalg.cholesky(a @ a.T + a.shape[0] * jnp.eye(a.shape[0], dtype=a.dtype))


def vmapped(a: jax.Array, b: jax.Array) -> jax.Array:
    return jax.vmap(jnp.matmul)(a, b)


def chain(a: jax.Array, b: jax.Array, c: jax.Array) -> jax.Array:
    return jnp.einsum("bij,bjk,bkl->bil", a, b, c, optimize=[(0, 1), (0, 1)])


def preferred_f32(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=f32)


def int8_matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, preferred_element_type=jnp.int32)


def block(x: jax.Array, *weights: Any) -> jax.Array:
    """A transformer block: attention (wq, wk, wv, wo) then an MLP (w1, w2), residuals."""
    wq, wk, wv, wo, w1, w2 = weights
    h = x + attention(x, wq, wk, wv, wo)
    return h + mlp(h, w1, w2)


def adamw(params: Any, grads: Any, m: Any, v: Any) -> tuple[Any, Any, Any]:
    m = jax.tree.map(lambda a, g: 0.9 * a + 0.1 * g, m, grads)
    v = jax.tree.map(lambda a, g: 0.999 * a + 0.001 * g * g, v, grads)
    params = jax.tree.map(
        lambda p, a, b: p - 1e-3 * (a / (jnp.sqrt(b) + 1e-8) + 0.01 * p), params, m, v
    )
    return params, m, v


def train_mlp(params: Any, m: Any, v: Any, x: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
        return sq_loss(mlp)(x, p["w1"], p["w2"])

    value, grads = jax.value_and_grad(loss)(params)
    return value, *adamw(params, grads, m, v)


def train_scan(params: Any, m: Any, v: Any, x: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
        return sq_loss(scan_layers)(x, p["ws"])

    value, grads = jax.value_and_grad(loss)(params)
    return value, *adamw(params, grads, m, v)


def train_block(params: Any, m: Any, v: Any, x: jax.Array) -> Any:
    def loss(p: Any) -> jax.Array:
        return jnp.mean(block(x, *p).astype(f32) ** 2)

    value, grads = jax.value_and_grad(loss)(params)
    return value, *adamw(params, grads, m, v)


MESH_2X4 = "x=2,y=4"


def _shard_map_psum() -> Callable[..., Any]:
    mesh = jax.sharding.AbstractMesh((2, 4), ("x", "y"))

    @partial(jax.shard_map, mesh=mesh, in_specs=(P("x", "y"), P("y", None)), out_specs=P("x", None))
    def body(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.psum(a @ b, "y")

    def program(a: jax.Array, b: jax.Array) -> jax.Array:
        return jnp.tanh(body(a, b))

    return program


def _shard_map_gather() -> Callable[..., Any]:
    mesh = jax.sharding.AbstractMesh((2, 4), ("x", "y"))

    @partial(
        jax.shard_map,
        mesh=mesh,
        in_specs=(P("x", None), P(None, "y")),
        out_specs=P("x", None),
        check_vma=False,
    )
    def body(a: jax.Array, w: jax.Array) -> jax.Array:
        full = jax.lax.all_gather(w, "y", axis=1, tiled=True)
        return a @ full

    return body


def mlp_params(d: int, f: int, dtype: Any = f32) -> dict[str, Any]:
    return {"w1": S((d, f), dtype), "w2": S((f, d), dtype)}


def block_params(d: int, h: int, k: int, f: int) -> tuple[Any, ...]:
    return (
        S((d, h, k), f32),
        S((d, h, k), f32),
        S((d, h, k), f32),
        S((h, k, d), f32),
        S((d, f), f32),
        S((f, d), f32),
    )


def corpus() -> list[Program]:
    """The corpus (built lazily: shard_map needs JAX set up)."""
    b, d, f = 64, 128, 256
    x = S((b, d), f32)
    ws4 = S((4, d, d), f32)
    layer = dot(b, d, d)
    bb, t, dd, h, k = 2, 64, 128, 4, 32
    att_args = (
        S((bb, t, dd), f32),
        S((dd, h, k), f32),
        S((dd, h, k), f32),
        S((dd, h, k), f32),
        S((h, k, dd), f32),
    )
    return [
        Program("matmul-f32", matmul, (x, S((d, f), f32)), dot(b, d, f), compare_xla=True),
        Program(
            "mlp-f32", mlp, (x, S((d, f), f32), S((f, d), f32)), 2 * dot(b, d, f), compare_xla=True
        ),
        Program(
            "gated-mlp-f32",
            gated_mlp,
            (x, S((d, f), f32), S((d, f), f32), S((f, d), f32)),
            3 * dot(b, d, f),
            compare_xla=True,
        ),
        Program(
            "attention-f32", attention, att_args, attention_flops(bb, t, dd, h, k), compare_xla=True
        ),
        Program("unrolled-4-f32", unrolled_layers, (x, ws4), 4 * layer, compare_xla=True),
        Program(
            "vmap-matmul-f32",
            vmapped,
            (S((4, b, d), f32), S((4, d, f), f32)),
            4 * dot(b, d, f),
            compare_xla=True,
        ),
        Program(
            "einsum-chain-f32",
            chain,
            (S((4, 32, 64), f32), S((4, 64, 48), f32), S((4, 48, 16), f32)),
            4 * (dot(32, 64, 48) + dot(32, 48, 16)),
            compare_xla=True,
        ),
        Program(
            "conv-same-f32",
            conv_same,
            (S((2, 16, 16, 8), f32), S((3, 3, 8, 16), f32)),
            2 * 2 * 16 * 46 * 46 * 8,
            compare_xla=True,
        ),  # 46 = 16·3 - 2 valid taps/dim
        Program(
            "conv-strided-f32",
            conv_strided,
            (S((2, 17, 17, 8), f32), S((3, 3, 8, 16), f32)),
            2 * 2 * 16 * (8 * 3) ** 2 * 8,
            compare_xla=True,
        ),
        Program(
            "depthwise-conv-f32",
            depthwise,
            (S((2, 16, 16, 8), f32), S((3, 3, 1, 8), f32)),
            2 * 2 * 8 * (14 * 3) ** 2 * 1,
            compare_xla=True,
        ),
        Program(
            "block-f32",
            block,
            (S((bb, t, dd), f32), *block_params(dd, h, k, 2 * dd)),
            attention_flops(bb, t, dd, h, k) + 2 * dot(bb * t, dd, 2 * dd),
            compare_xla=True,
        ),
        # loops: XLA's own counts take each body once
        Program("scan-4-f32", scan_layers, (x, ws4), 4 * layer, loop_factor=4),
        Program(
            "scan-8-bf16",
            scan_layers,
            (S((b, d), bf16), S((8, d, d), bf16)),
            8 * layer,
            loop_factor=8,
        ),
        Program(
            "nested-scan-3x4-f32",
            nested_scans,
            (x, S((3, 4, d, d), f32)),
            12 * layer,
            loop_factor=12,
        ),
        Program("fori-5-f32", fori, (x, S((d, d), f32)), 5 * layer, loop_factor=5),
        Program("fori-3-in-scan-4-f32", fori_in_scan, (x, ws4), 12 * layer, loop_factor=12),
        # autodiff: forward 2 dots, backward dW2, dh, dW1 (dx is not asked for)
        Program(
            "grad-mlp-f32",
            grad_mlp,
            (x, S((d, f), f32), S((f, d), f32)),
            5 * dot(b, d, f),
            compare_xla=True,
        ),
        # jax.checkpoint asks the backward pass to recompute h = relu(x @ w1), but the
        # forward's h is live anyway (value_and_grad) and XLA keeps it: 5 dots run, while
        # roofline, reading the jaxpr, counts the recomputation (6)
        Program(
            "remat-mlp-f32",
            remat_mlp,
            (x, S((d, f), f32), S((f, d), f32)),
            5 * dot(b, d, f),
            compare_xla=True,
            roofline_right=False,
        ),
        # forward 4 layers; backward per layer dW and dh (dh of the first layer is not
        # needed, but inside the scan every iteration computes it)
        Program("grad-scan-4-f32", grad_scan, (x, ws4), 4 * layer + 4 * 2 * layer, loop_factor=4),
        # remat inside the scan: the backward scan recomputes each layer's forward
        Program("remat-scan-4-f32", remat_scan, (x, ws4), 4 * layer + 4 * 3 * layer, loop_factor=4),
        Program(
            "grad-conv-f32",
            grad_conv,
            (S((2, 17, 17, 8), f32), S((3, 3, 8, 16), f32)),
            2 * (2 * 2 * 16 * (8 * 3) ** 2 * 8),
            compare_xla=True,
        ),
        # control flow
        Program("cond-f32", cond, (S((), jnp.int32), x, S((d, d), f32)), layer),
        Program("switch-3-f32", switch, (S((), jnp.int32), x, S((d, d), f32)), 2 * layer),
        Program("cholesky-custom-call-f32", cholesky, (S((64, 64), f32),), dot(64, 64, 64)),
        Program(
            "dynamic-while-f32",
            dynamic_while,
            (S((), jnp.int32), x, S((d, d), f32)),
            layer,
            static=False,
        ),
        # dtypes
        Program("matmul-bf16", matmul, (S((b, d), bf16), S((d, f), bf16)), dot(b, d, f)),
        Program(
            "preferred-f32-from-bf16",
            preferred_f32,
            (S((b, d), bf16), S((d, f), bf16)),
            dot(b, d, f),
        ),
        Program(
            "int8-matmul", int8_matmul, (S((b, d), jnp.int8), S((d, f), jnp.int8)), dot(b, d, f)
        ),
        # sharded on a 2x4 mesh (x, y): per-chip FLOPs
        Program(
            "megatron-mlp-bf16",
            mlp,
            (S((512, 256), bf16), S((256, 1024), bf16), S((1024, 256), bf16)),
            2 * dot(256, 256, 256),
            mesh=MESH_2X4,
            in_shardings=("x,None", "None,y", "y,None"),
            out_shardings="x,None",
        ),
        # FSDP: the weight stored over all 8 chips is gathered for the local batch rows
        Program(
            "fsdp-matmul-f32",
            matmul,
            (S((512, 256), f32), S((256, 512), f32)),
            dot(64, 256, 512),
            mesh=MESH_2X4,
            in_shardings=("x+y,None", "x+y,None"),
            out_shardings="x+y,None",
        ),
        # K sharded over y, output sharded over y too: a reduce-scatter
        Program(
            "reduce-scatter-matmul-bf16",
            matmul,
            (S((256, 512), bf16), S((512, 256), bf16)),
            dot(128, 128, 256),
            mesh=MESH_2X4,
            in_shardings=("x,y", "y,None"),
            out_shardings="x,y",
        ),
        Program(
            "attention-heads-bf16",
            attention,
            (
                S((4, 64, 128), bf16),
                S((128, 8, 32), bf16),
                S((128, 8, 32), bf16),
                S((128, 8, 32), bf16),
                S((8, 32, 128), bf16),
            ),
            attention_flops(2, 64, 128, 2, 32),
            mesh=MESH_2X4,
            in_shardings=(
                "x,None,None",
                "None,y,None",
                "None,y,None",
                "None,y,None",
                "y,None,None",
            ),
            out_shardings="x,None,None",
        ),
        # the layer weights' columns on y: each layer is a [128,512] @ [512,128] per chip,
        # and the carry is gathered back over y every iteration
        Program(
            "scan-sharded-f32",
            scan_layers,
            (S((256, 512), f32), S((6, 512, 512), f32)),
            6 * dot(128, 512, 128),
            mesh=MESH_2X4,
            in_shardings=("x,None", "None,None,y"),
            loop_factor=6,
        ),
        Program(
            "shard-map-psum-f32",
            _shard_map_psum(),
            (S((256, 512), f32), S((512, 256), f32)),
            dot(128, 128, 256),
            mesh=MESH_2X4,
            in_shardings=("x,y", "y,None"),
        ),
        Program(
            "shard-map-all-gather-f32",
            _shard_map_gather(),
            (S((256, 512), f32), S((512, 256), f32)),
            dot(128, 512, 256),
            mesh=MESH_2X4,
            in_shardings=("x,None", "None,y"),
        ),
        Program(
            "train-mlp-adamw-f32",
            train_mlp,
            (mlp_params(d, f), mlp_params(d, f), mlp_params(d, f), x),
            5 * dot(b, d, f),
            compare_xla=True,
        ),
    ]


#: Small train steps (forward, backward, AdamW) for the memory comparison.
def memory_corpus() -> list[Program]:
    d, f = 128, 256
    x = S((64, d), f32)
    ws = {"ws": S((4, d, d), f32)}
    bp = block_params(64, 4, 16, 128)
    return [
        Program(
            "train-mlp", train_mlp, (mlp_params(d, f), mlp_params(d, f), mlp_params(d, f), x), 0
        ),
        Program(
            "train-mlp-wide",
            train_mlp,
            (
                mlp_params(256, 1024),
                mlp_params(256, 1024),
                mlp_params(256, 1024),
                S((128, 256), f32),
            ),
            0,
        ),
        Program("train-scan", train_scan, (ws, ws, ws, x), 0),
        Program("train-block", train_block, (bp, bp, bp, S((2, 32, 64), f32)), 0),
        Program(
            "train-mlp-sharded",
            train_mlp,
            (mlp_params(d, f), mlp_params(d, f), mlp_params(d, f), S((64, d), f32)),
            0,
            mesh=MESH_2X4,
            in_shardings=({"w1": "None,y", "w2": "y,None"},) * 3 + ("x,None",),
        ),
    ]
