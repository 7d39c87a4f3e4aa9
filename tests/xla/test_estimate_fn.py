"""estimate_jitted and the estimate-fn / estimate-hlo commands, on real compiles.

Expected values come from the shapes and the scaling book's formulas written out here,
from jax.experimental.roofline and from XLA's cost_analysis()/memory_analysis() — never
from our own functions. The corpus lives in estimate_corpus.py.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.jax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from estimate_corpus import Program, corpus, memory_corpus  # noqa: E402

from sharding_roofline.cli import main  # noqa: E402
from sharding_roofline.einsum import Einsum  # noqa: E402
from sharding_roofline.errors import SpecError, ValidationError  # noqa: E402
from sharding_roofline.mesh import DeviceMesh  # noqa: E402
from sharding_roofline.planner import estimate as planner_estimate  # noqa: E402
from sharding_roofline.presets import load_preset  # noqa: E402
from sharding_roofline.xla.estimate_fn import estimate_jitted  # noqa: E402
from sharding_roofline.xla.hlo_cost import ProgramEstimate  # noqa: E402

BF16 = 2
DATA = Path(__file__).resolve().parents[1] / "data" / "hlo"
TARGETS = {"tpu-v5p": "2x2x2", "h100": "1x8"}  # a 2x4 mesh on each: 8 chips
PROGRAMS = {p.id: p for p in corpus()}


def target(hardware: str, mesh: str = "x=2,y=4") -> DeviceMesh:
    topology = TARGETS[hardware] if mesh == "x=2,y=4" else None
    return DeviceMesh.create(load_preset(hardware), mesh, topology)


@functools.cache
def estimated(program_id: str) -> ProgramEstimate:
    p = PROGRAMS[program_id]
    return estimate_jitted(
        p.fn,
        *p.args,
        mesh=target("h100", p.mesh),
        in_shardings=p.in_shardings,
        out_shardings=p.out_shardings,
    )


# --------------------------------------------------------------------------------------
# Hand calculations: a 2-layer MLP and an attention block, on two presets

B, D, F = 8192, 2048, 8192  # MLP: x[B, D] over x, w1[D, F] over y (columns), w2 over y (rows)


def mlp(x: Any, w1: Any, w2: Any) -> Any:
    return jax.nn.relu(x @ w1) @ w2


def book_all_reduce_s(hardware: str, v_bytes: float) -> float:
    """AllReduce of V bytes per chip over y (4 chips) of the 2x4 mesh: twice a
    ReduceScatter (= an AllGather): on TPU the larger of the bandwidth and latency terms,
    on GPU their sum plus NCCL's base latency (NCCL's model, src/graph/tuning.cc)."""
    if hardware == "tpu-v5p":
        # y spans two dims of 2 chips of a 2x2x2 slice, no wraparound (v5p wraps only on
        # full 4x4x4 cubes): per line of X chips T = V·(X-1)/(X·W_uni), the two lines in
        # parallel (their rates add); latency: 1 hop per line, ~1 us each (sharding.md).
        w_uni, x_chips, lines = 9e10, 2, 2
        gather = v_bytes * (x_chips - 1) / (x_chips * w_uni) / lines
        latency = lines * (x_chips - 1) * 1e-6
    else:
        # 4 GPUs of one NVLink node: T = V·(D-1)/(D·W), W = 450 GB/s per GPU each way
        # (gpus.md); latency: 8.4 us once plus 2(D-1) ring steps of 3.4 us (NCCL's NVLink
        # ring latency), added to the bandwidth term.
        w_gpu, d_gpus = 4.5e11, 4
        gather = v_bytes * (d_gpus - 1) / (d_gpus * w_gpu)
        return 2 * gather + 8.4e-6 + 2 * (d_gpus - 1) * 3.4e-6
    return max(2 * gather, 2 * latency)


@pytest.mark.parametrize("hardware", list(TARGETS))
def test_mlp_matches_the_hand_calculation(hardware: str) -> None:
    bf = jnp.bfloat16
    S = jax.ShapeDtypeStruct
    mesh = target(hardware)
    est = estimate_jitted(
        mlp,
        S((B, D), bf),
        S((D, F), bf),
        S((F, D), bf),
        mesh=mesh,
        in_shardings=("x,None", "None,y", "y,None"),
        out_shardings="x,None",
    )
    chip = mesh.hardware.chip
    b, f = B // 2, F // 4  # local rows of x, local columns of w1 (rows of w2)
    dot_flops = 2 * b * D * f  # 2·prod for each of the two matmuls
    dots = sorted((o for o in est.ops if o.op.flops), key=lambda o: o.op.name)
    assert [o.op.flops for o in dots] == [dot_flops, dot_flops]
    assert sorted(o.op.hbm_bytes for o in dots) == [(b * D + D * f + b * f) * BF16] * 2
    for o in dots:
        assert o.compute_s == pytest.approx(dot_flops / chip.peak_flops_per_s["bfloat16"])
        assert o.bound.value == "compute"
    relu = [o for o in est.ops if not o.op.flops and not o.collectives]
    assert [o.op.hbm_bytes for o in relu] == [2 * b * f * BF16]  # read h, write relu(h)
    (ar,) = est.collectives
    v_bytes = b * D * BF16  # the partial output, summed over y
    assert ar.walked.kind == "all-reduce"
    assert ar.axes == ("y",)
    assert ar.walked.dtype == "bf16"  # the CPU compiled it as f32
    assert ar.cost is not None
    assert ar.cost.bytes_sent_per_chip == pytest.approx(2 * 3 / 4 * v_bytes)
    assert ar.time_s == pytest.approx(book_all_reduce_s(hardware, v_bytes))
    (ar_op,) = [o for o in est.ops if o.collectives]
    assert ar_op.op.hbm_bytes == 2 * v_bytes
    total_bytes = 2 * (b * D + D * f + b * f) * BF16 + 2 * b * f * BF16 + 2 * v_bytes
    assert est.flops_per_chip == 2 * dot_flops
    assert est.hbm_bytes_per_chip == total_bytes
    assert est.compute_s == pytest.approx(2 * dot_flops / chip.peak_flops_per_s["bfloat16"])
    assert est.hbm_s == pytest.approx(total_bytes / chip.hbm_bytes_per_s)
    assert est.comm_s == pytest.approx(book_all_reduce_s(hardware, v_bytes))
    assert est.lower_bound_s == pytest.approx(max(est.compute_s, est.hbm_s, est.comm_s))


BA, T, DM, H, DH = 4, 256, 512, 8, 64  # attention: batch over x, heads over y


def attention(x: Any, wq: Any, wk: Any, wv: Any, wo: Any) -> Any:
    q = jnp.einsum("btd,dhk->bthk", x, wq)
    k = jnp.einsum("btd,dhk->bthk", x, wk)
    v = jnp.einsum("btd,dhk->bthk", x, wv)
    s = jnp.einsum("bthk,bshk->bhts", q, k) / jnp.sqrt(DH).astype(x.dtype)
    p = jax.nn.softmax(s, axis=-1)
    o = jnp.einsum("bhts,bshk->bthk", p, v)
    return jnp.einsum("bthk,hkd->btd", o, wo)


@pytest.mark.parametrize("hardware", list(TARGETS))
def test_attention_matches_the_hand_calculation(hardware: str) -> None:
    bf = jnp.bfloat16
    S = jax.ShapeDtypeStruct
    mesh = target(hardware)
    w = S((DM, H, DH), bf)
    est = estimate_jitted(
        attention,
        S((BA, T, DM), bf),
        w,
        w,
        w,
        S((H, DH, DM), bf),
        mesh=mesh,
        in_shardings=("x,None,None", "None,y,None", "None,y,None", "None,y,None", "y,None,None"),
        out_shardings="x,None,None",
    )
    b, h = BA // 2, H // 4
    projection = 2 * b * T * DM * h * DH  # q, k, v and the output projection
    scores = 2 * b * h * T * T * DH  # q·k, and p·v
    assert sorted(o.op.flops for o in est.ops if o.op.flops) == sorted(
        [scores, scores] + [projection] * 4
    )
    # q/k/v projections read x[b,T,D] and w[D,h,Dh], write q[b,T,h,Dh]
    qkv_bytes = (b * T * DM + DM * h * DH + b * T * h * DH) * BF16
    assert sum(o.op.hbm_bytes == qkv_bytes for o in est.ops if o.op.flops == projection) >= 3
    (ar,) = est.collectives
    v_bytes = b * T * DM * BF16
    assert (ar.walked.kind, ar.axes, ar.walked.dtype) == ("all-reduce", ("y",), "bf16")
    assert ar.time_s == pytest.approx(book_all_reduce_s(hardware, v_bytes))
    chip = mesh.hardware.chip
    assert est.compute_s == pytest.approx(
        (4 * projection + 2 * scores) / chip.peak_flops_per_s["bfloat16"]
    )


# --------------------------------------------------------------------------------------
# The corpus


def test_corpus_is_broad() -> None:
    ids = set(PROGRAMS)
    assert len(ids) >= 30
    for needed in (
        "scan",
        "nested-scan",
        "fori",
        "remat",
        "grad-scan",
        "shard-map",
        "custom-call",
        "cond",
        "switch",
        "conv",
        "train",
    ):
        assert any(needed in i for i in ids), needed


@pytest.mark.parametrize("program_id", list(PROGRAMS))
def test_corpus_matmul_flops_match_the_analytic_count(program_id: str) -> None:
    p = PROGRAMS[program_id]
    est = estimated(program_id)
    assert est.flops_per_chip == pytest.approx(p.flops, rel=0.01)
    if not p.static:  # the loop body counted once, and said so
        assert any("known_trip_count" in u.reason for u in est.uncosted)


def _roofline(p: Program) -> Any:
    from jax.experimental import roofline  # noqa: PLC0415

    return roofline.roofline(p.fn)(*p.args)[1]


UNROLLED = [p.id for p in PROGRAMS.values() if p.compare_xla]
LOOPED = [p.id for p in PROGRAMS.values() if p.loop_factor > 1 and p.mesh == "x=1"]


@pytest.mark.parametrize("program_id", UNROLLED)
def test_unrolled_programs_agree_with_xla_and_roofline(program_id: str) -> None:
    p = PROGRAMS[program_id]
    est = estimated(program_id)
    xla = est.compiler_cost
    assert xla is not None
    # XLA's bytes accessed: every top-level op's operands and results, as we count them
    # (with the compiled types: these programs are f32)
    assert est.walk.total_hbm_bytes(printed=True) == pytest.approx(xla["bytes accessed"], rel=1e-3)
    # XLA's flops also count elementwise ops (and the optimiser's): a few percent more
    assert est.flops_per_chip <= xla["flops"] <= 1.05 * est.flops_per_chip
    rf = _roofline(p)
    if p.roofline_right and rf.flops:  # roofline has no rule for convolutions (0)
        assert est.flops_per_chip == rf.flops
        # roofline's hbm_bytes are the dots' operands and results only
        dot_bytes = sum(o.op.hbm_bytes * o.op.count for o in est.ops if o.op.flops)
        assert dot_bytes == rf.hbm_bytes


@pytest.mark.parametrize("program_id", LOOPED)
def test_loops_xla_and_roofline_are_off_by_the_trip_count(program_id: str) -> None:
    p = PROGRAMS[program_id]
    est = estimated(program_id)
    assert est.flops_per_chip == pytest.approx(p.flops, rel=0.01)  # ours: right
    rf = _roofline(p)
    assert est.flops_per_chip / rf.flops == pytest.approx(p.loop_factor, rel=0.01)
    assert est.compiler_cost is not None
    xla_ratio = est.flops_per_chip / est.compiler_cost["flops"]
    assert xla_ratio == pytest.approx(p.loop_factor, rel=0.1)  # (+ their elementwise flops)


def test_sharded_programs_cost_their_collectives() -> None:
    kinds = {
        pid: sorted((c.walked.kind, c.axes) for c in estimated(pid).collectives)
        for pid in (
            "megatron-mlp-bf16",
            "fsdp-matmul-f32",
            "reduce-scatter-matmul-bf16",
            "shard-map-psum-f32",
            "shard-map-all-gather-f32",
            "scan-sharded-f32",
        )
    }
    assert kinds == {
        "megatron-mlp-bf16": [("all-reduce", ("y",))],
        "fsdp-matmul-f32": [("all-gather", ("x", "y"))],
        "reduce-scatter-matmul-bf16": [("reduce-scatter", ("y",))],
        "shard-map-psum-f32": [("all-reduce", ("y",))],
        "shard-map-all-gather-f32": [("all-gather", ("y",))],
        "scan-sharded-f32": [("all-gather", ("y",))],
    }
    scan = estimated("scan-sharded-f32")
    assert [c.count for c in scan.collectives] == [6]  # the carry, gathered every layer


# --------------------------------------------------------------------------------------
# Single einsums: the same numbers as the planner when XLA picks the planner's algorithm

EINSUMS = [
    # (hardware, equation, dims, lhs, rhs, out)
    ("h100", "bd,df->bf", "b=1024,d=1024,f=4096", "x,None", "None,y", "x,y"),
    ("h100", "bd,df->bf", "b=1024,d=1024,f=4096", "x,y", "y,None", "x,None"),
    ("h100", "bd,df->bf", "b=1024,d=1024,f=4096", "x,y", "y,None", "x,y"),
    ("h100", "bd,df->bf", "b=1024,d=1024,f=4096", "None,y", "None,None", "None,None"),
    ("h100", "bmk,kn->bmn", "b=8,m=256,k=512,n=1024", "x,None,y", "y,None", "x,None,y"),
    ("tpu-v5p", "bd,df->bf", "b=1024,d=1024,f=4096", "x,y", "y,None", "x,y"),
    ("tpu-v5p", "bd,df->bf", "b=1024,d=1024,f=4096", "x,None", "x+y,None", "x,None"),
    ("tpu-v5p", "bd,df->bf", "b=1024,d=1024,f=4096", "x+y,None", "None,None", "x+y,None"),
]


@pytest.mark.parametrize(
    "case", EINSUMS, ids=[f"{h}-{e}-{lhs}-{r}-{o}" for h, e, _, lhs, r, o in EINSUMS]
)
def test_single_einsums_agree_with_the_planner(case: tuple[str, ...]) -> None:
    hardware, equation, dims, lhs, rhs, out = case
    mesh = target(hardware)
    plan = planner_estimate(
        Einsum.create(equation, dims, dtype="bfloat16"), mesh, lhs=lhs, rhs=rhs, out=out
    )
    sizes = {k: int(v) for k, v in (item.split("=") for item in dims.split(","))}
    a, b = equation.split("->", maxsplit=1)[0].split(",")

    def arg(letters: str) -> Any:
        return jax.ShapeDtypeStruct(tuple(sizes[c] for c in letters), jnp.bfloat16)

    est = estimate_jitted(
        lambda p, q: jnp.einsum(equation, p, q),
        arg(a),
        arg(b),
        mesh=mesh,
        in_shardings=(lhs, rhs),
        out_shardings=out,
    )
    assert est.flops_per_chip == plan.cost.flops
    (dot_op,) = [o for o in est.ops if o.op.flops]
    assert dot_op.op.hbm_bytes == plan.cost.hbm_bytes  # local operands + local result
    ours = [
        (c.walked.kind, c.axes, c.cost.bytes_sent_per_chip if c.cost else None, c.time_s)
        for c in est.collectives
    ]
    theirs = [
        (s.kind.value, s.axes, s.cost.bytes_sent_per_chip, s.cost.time_s)
        for s in plan.collectives
        if s.cost is not None
    ]
    assert [o[:3] for o in ours] == [t[:3] for t in theirs]
    assert [o[3] for o in ours] == pytest.approx([t[3] for t in theirs])


# --------------------------------------------------------------------------------------
# Memory: ours against memory_analysis() on small train steps

MEMORY = {p.id: p for p in memory_corpus()}


@functools.cache
def memory_estimate(program_id: str) -> ProgramEstimate:
    p = MEMORY[program_id]
    return estimate_jitted(p.fn, *p.args, mesh=target("h100", p.mesh), in_shardings=p.in_shardings)


def test_peak_memory_of_train_steps_against_memory_analysis() -> None:
    gaps = []
    for pid in MEMORY:
        est = memory_estimate(pid)
        ours, xla = est.walk.memory_as_printed, est.compiler_memory
        assert ours is not None
        assert xla is not None
        # arguments: exact; outputs: XLA adds the output tuple's index table (8 B a leaf)
        assert ours.argument_bytes == xla["argument_size_in_bytes"]
        assert 0 <= xla["output_size_in_bytes"] - ours.output_bytes <= 8 * 32
        gaps.append(ours.peak_bytes / xla["footprint_bytes"] - 1)
    assert abs(statistics.median(gaps)) <= 0.05
    assert all(abs(g) < 0.15 for g in gaps)


def test_memory_on_the_target_uses_logical_types() -> None:
    est = estimated("megatron-mlp-bf16")
    assert est.walk.memory is not None
    assert est.walk.memory_as_printed is not None
    # bf16 arguments print as bf16 even on CPU; the f32 temporaries are bf16 on the chip
    assert est.walk.memory.argument_bytes == est.walk.memory_as_printed.argument_bytes
    assert est.walk.memory.temp_peak_bytes < est.walk.memory_as_printed.temp_peak_bytes
    assert est.as_dict()["memory_per_chip_bytes"]["fits"] is True


# --------------------------------------------------------------------------------------
# Errors name the bad value and the fix, never a JAX traceback


def test_errors_are_ours() -> None:
    S = jax.ShapeDtypeStruct
    args = (S((64, 128), jnp.float32), S((128, 64), jnp.float32))
    with pytest.raises(SpecError, match=r"in_shardings has 1 entries .* 2 arguments"):
        estimate_jitted(mlp, *args, mesh=target("h100"), in_shardings=("x,None",))
    with pytest.raises(SpecError, match=r"mesh axis 'z'"):
        estimate_jitted(
            lambda a, b: a @ b, *args, mesh=target("h100"), in_shardings=("z,None", None)
        )
    with pytest.raises(ValidationError, match=r"JAX could not compile .*TypeError"):
        estimate_jitted(lambda a, b: a @ a, *args, mesh=target("h100"))
    with pytest.raises(SpecError, match=r"hardware is needed"):
        estimate_jitted(lambda a, b: a @ b, *args, mesh="x=2,y=4")


# --------------------------------------------------------------------------------------
# The CLI

USER_MODULE = """
import jax

def mlp(x, w1, w2):
    return jax.nn.relu(x @ w1) @ w2
"""


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_estimate_fn_cli_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sr_user_model.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, _ = run_cli(
        [
            "estimate-fn",
            "sr_user_model:mlp",
            "--args",
            "bf16[512,256],bf16[256,1024],bf16[1024,256]",
            "--in-shardings",
            "x,None;None,y;y,None",
            "--out-shardings",
            "x,None",
            "--hardware",
            "tpu-v5p",
            "--mesh",
            "x=2,y=4",
            "--topology",
            "2x2x2",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    assert set(data["totals"]["time_s"]) >= {"compute", "hbm", "comm", "lower_bound", "upper_bound"}
    assert data["totals"]["flops_per_chip"] == 2 * (2 * 256 * 256 * 256)
    assert {"name", "kind", "flops", "hbm_bytes", "count", "time_s", "bound"} <= set(data["ops"][0])
    (coll,) = data["collectives"]
    assert coll["kind"] == "all-reduce"
    assert coll["axes"] == ["y"]
    assert coll["elements_in_per_chip"] == coll["elements_out_per_chip"] == 256 * 256
    assert coll["bytes_sent_per_chip"] == 2 * 3 / 4 * 256 * 256 * BF16
    assert data["uncosted"] == []


def test_estimate_fn_cli_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sr_user_model2.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--hardware", "h100", "--mesh", "x=2,y=4", "--topology", "1x8", "--json"]
    cases = [
        (["sr_user_model2:mlp", "--args", "bf16[8,16"], r"not DTYPE\[d1,d2,...\]"),
        (["sr_user_model2:mlp", "--args", "bf17[8,16]"], r"unknown dtype 'bf17'"),
        (
            ["sr_user_model2:mlp", "--args", "f32[8,16],f32[16,8]", "--in-shardings", "x,None"],
            r"1 ';'-separated entries but there are 2 arguments",
        ),
        (
            ["sr_user_model2:mlp", "--args", "f32[6,16]", "--in-shardings", "y,None"],
            r"does not divide 6",
        ),
        (["nope_no_such_module:f", "--args", "f32[8]"], r"cannot import module"),
        (["sr_user_model2:nope", "--args", "f32[8]"], r"has no 'nope'.*mlp"),
        (["sr_user_model2", "--args", "f32[8]"], r"not MODULE:FUNCTION"),
        (["sr_user_model2:mlp", "--args", "f32[8,16]"], r"JAX could not compile"),
    ]
    for argv, pattern in cases:
        code, out, _ = run_cli(["estimate-fn", *argv, *common], capsys)
        assert code == 1, argv
        error = json.loads(out)
        assert set(error) == {"error", "fix"}
        assert __import__("re").search(pattern, error["error"]), (argv, error)
        assert "Traceback" not in out


def test_estimate_hlo_cli(capsys: pytest.CaptureFixture[str]) -> None:
    path = str(DATA / "scan_f32.txt")
    code, out, _ = run_cli(
        [
            "estimate-hlo",
            path,
            "--hardware",
            "tpu-v5p",
            "--mesh",
            "x=2,y=4",
            "--topology",
            "2x2x2",
            "--json",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(out)
    # 6 scanned layers of [128,128] @ [128,512] per chip
    assert data["totals"]["flops_per_chip"] == 6 * 2 * 128 * 128 * 512
    assert {(c["kind"], c["count"]) for c in data["collectives"]} == {
        ("reduce-scatter", 6),
        ("all-gather", 1),
    }
    code, out, _ = run_cli(
        ["estimate-hlo", path, "--hardware", "tpu-v5p", "--mesh", "x=2,y=4", "--topology", "2x2x2"],
        capsys,
    )
    assert code == 0
    assert "reduce-scatter" in out
    assert "memory per chip" in out
    code, out, err = run_cli(
        ["estimate-hlo", "/no/such.txt", "--hardware", "h100", "--mesh", "x=8"], capsys
    )
    assert code == 1
    assert "cannot read HLO file" in err
    code, out, _ = run_cli(
        [
            "estimate-hlo",
            path,
            "--hardware",
            "h100",
            "--mesh",
            "x=4,y=4",
            "--topology",
            "2x8",
            "--json",
        ],
        capsys,
    )
    assert code == 1
    assert "runs on 8 devices" in json.loads(out)["error"]
