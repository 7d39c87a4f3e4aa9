"""Figures: the plotted numbers, read back from the Axes by ``gid``, against the book.

Expected values are computed here from the scaling book's formulas with named
intermediates (and, where the book states one, compared with its answer), never from the
plotting code. Pixels are not checked.
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
from pathlib import Path

import matplotlib
import pytest

matplotlib.use("Agg")

import itertools

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from sharding_roofline import (
    Bottleneck,
    Collective,
    DeviceMesh,
    Einsum,
    HardwareSpec,
    Overlap,
    Plan,
    SpecError,
    crossover,
    list_presets,
    load_preset,
    plan,
)
from sharding_roofline import plot as sr_plot
from sharding_roofline.hardware import Wraparound

BF16 = 2
US = 1e-6
# The book's v5p numbers (tpus.md): C = 4.59e14 bf16 FLOPs/s, W_ici = 1.8e11 B/s bidirectional.
V5P_PEAK = 4.59e14
V5P_W_UNI = 9e10
V5P_W_BIDI = 2 * V5P_W_UNI
V5P_HOP_S = 1 * US  # sharding.md: about 1 us per ICI hop
H100_PEAK = 9.89e14
H100_NVLINK = 450e9


def line(ax: Axes, gid: str) -> Line2D:
    found = [artist for artist in ax.get_lines() if artist.get_gid() == gid]
    assert len(found) == 1, f"expected one line {gid!r}, found {len(found)}"
    return found[0]


def xy(ax: Axes, gid: str) -> tuple[list[float], list[float]]:
    artist = line(ax, gid)
    return [float(x) for x in artist.get_xdata()], [float(y) for y in artist.get_ydata()]


def log_interp(xs: list[float], ys: list[float], x: float) -> float:
    """The value at ``x`` of the straight log-log segments through (xs, ys)."""
    for i in range(len(xs) - 1):
        (x0, y0), (x1, y1) = (xs[i], ys[i]), (xs[i + 1], ys[i + 1])
        if x0 <= x <= x1:
            t = math.log(x / x0) / math.log(x1 / x0)
            return math.exp(math.log(y0) + t * math.log(y1 / y0))
    raise AssertionError(f"{x} outside [{xs[0]}, {xs[-1]}]")


def v5p_with_wraparound() -> HardwareSpec:
    """v5p whose every slice wraps: a 4-chip ``"4"`` then models ONE v5p axis with its
    wraparound, as inside a 4x4x4 cube, which is what the book's C/W_ici = 2550 assumes.
    A real 4-chip v5p slice is 1x1x4, smaller than a cube, and has no wraparound
    (tpus.md: "smaller slices (2x2x1, 2x2x2, and even 2x2x4) have no wraparound")."""
    v5p = load_preset("tpu-v5p")
    assert v5p.ici is not None
    return dataclasses.replace(v5p, ici=dataclasses.replace(v5p.ici, wraparound=Wraparound.ALWAYS))


def fsdp(
    hardware: str | HardwareSpec, topology: str, mesh_text: str = "x=4", b: int = 16384
) -> Plan:
    """The book's FSDP step: batch and weights stored sharded over x; at the op the batch is
    split over x and nothing else (b=x, d and f whole), so the weights are all-gathered."""
    einsum = Einsum.create("bd,df->bf", f"b={b},d=8192,f=32768")
    spec = load_preset(hardware) if isinstance(hardware, str) else hardware
    mesh = DeviceMesh.create(spec, mesh_text, topology)
    ranking = plan(einsum, mesh, lhs="x,None", rhs="x,None", out="x,None", top=None)
    return ranking.find(b="x", d="", f="")


def fsdp_in_a_cube(b: int = 16384) -> Plan:
    """FSDP over the x axis of a real v5p 4x4x4 cube (every axis a ring of 4), with the
    weights' F and the output's F split over y+z (tensor parallel), so no axis is idle: the
    planner would otherwise also gather over idle replicated y and z (sharding.md Q2's "fun
    fact") and no longer use x alone. Only the weights' AllGather over x moves bytes."""
    einsum = Einsum.create("bd,df->bf", f"b={b},d=8192,f=32768")
    cube = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    ranking = plan(einsum, cube, lhs="x,None", rhs="x,y+z", out="x,y+z", top=None)
    return ranking.find(b="x", d="", f="y+z")


# -- roofline ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_presets())
def test_compute_roof_is_peak_and_hbm_ridge_is_critical_intensity(name: str) -> None:
    hardware = load_preset(name)
    peak = hardware.chip.peak_flops_per_s["bfloat16"]
    hbm_bytes_per_s = hardware.chip.hbm_bytes_per_s
    ax = sr_plot.roofline(hardware)
    _, roof_y = xy(ax, "roof:compute")
    assert roof_y == pytest.approx([peak, peak], rel=1e-12)
    xs, ys = xy(ax, "roof:hbm")
    assert ys[0] / xs[0] == pytest.approx(hbm_bytes_per_s, rel=1e-12)  # the HBM slope
    assert ys[1] == pytest.approx(peak, rel=1e-12)  # ... meets the roof
    assert xs[1] == pytest.approx(peak / hbm_bytes_per_s, rel=1e-12)  # ... at the ridge
    assert xs[1] == pytest.approx(hardware.chip.critical_intensity_flops_per_byte(), rel=1e-12)


@pytest.mark.parametrize(
    ("name", "book_ridge"),
    [
        pytest.param("tpu-v5e", 240, id="v5e-240"),  # roofline.md: 1.97e14 / 8.2e11
        pytest.param("h100", 295, id="h100-295"),  # roofline.md: 9.89e14 / 3.35e12
        pytest.param("b200", 281, id="b200-281"),  # gpus.md: 2250e12 / 8e12
    ],
)
def test_hbm_ridge_matches_book(name: str, book_ridge: float) -> None:
    xs, _ = xy(sr_plot.roofline(name), "roof:hbm")
    assert xs[1] == pytest.approx(book_ridge, abs=1)


def _ridges(ax: Axes) -> list[float]:
    peak = xy(ax, "roof:compute")[1][0]
    ridges = []
    for artist in ax.get_lines():
        gid = artist.get_gid() or ""
        if gid.startswith("roof:link:"):
            (x0, x1), (y0, y1) = artist.get_xdata(), artist.get_ydata()
            assert y1 == pytest.approx(peak, rel=1e-12)  # each slope ends on the roof
            assert y1 / x1 == pytest.approx(y0 / x0, rel=1e-9)  # a line through the origin
            ridges.append(float(x1))
    return sorted(ridges)


def test_link_roofs_of_bare_hardware_sit_at_peak_over_link_bandwidth() -> None:
    # v5p (tpus.md): ICI 9e10 one way, 1.8e11 both ways; DCN 6.25e9 per chip.
    wrapped = V5P_PEAK / V5P_W_BIDI  # the book's 2550
    line_only = V5P_PEAK / V5P_W_UNI
    dcn = V5P_PEAK / 6.25e9  # the book's 73,440
    assert wrapped == pytest.approx(2550)
    assert dcn == pytest.approx(73_440)
    ax = sr_plot.roofline("tpu-v5p")
    assert _ridges(ax) == pytest.approx([wrapped, line_only, dcn])
    # tpus.md: v5p slices wrap only when built of whole 4x4x4 cubes
    wrapped_label = line(ax, "roof:link:0").get_label()
    assert "ICI axis with wraparound (whole 4x4x4 cubes)" in wrapped_label
    # H100 (gpus.md): NVLink 450e9 per GPU (book: 2200); node egress 8 x 50e9 (book: 2475).
    nvlink = H100_PEAK / H100_NVLINK
    node = H100_PEAK / (8 * 50e9)
    assert nvlink == pytest.approx(2200, rel=0.01)
    assert node == pytest.approx(2475, rel=0.01)
    assert _ridges(sr_plot.roofline("h100")) == pytest.approx([nvlink, node])


def test_link_roofs_of_a_mesh_follow_each_axis() -> None:
    # v5e 8x16: the 16 axis wraps (W_bidi = 9e10), the 8 axis is a line, which the
    # AllGather crosses at W_uni·X/(X-1) = 4.5e10·8/7.
    peak = 1.97e14
    ring_16 = peak / 9e10
    line_8 = peak / (4.5e10 * 8 / 7)
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=8,y=16", "8x16")
    assert _ridges(sr_plot.roofline(mesh=mesh)) == pytest.approx(sorted([ring_16, line_8]))
    # v5p 4x4x4: three wrapped axes of 4, one merged roof at the book's 2550
    cube = DeviceMesh.create(load_preset("tpu-v5p"), "x=4,y=4,z=4", "4x4x4")
    ax = sr_plot.roofline(mesh=cube)
    assert _ridges(ax) == pytest.approx([2550])
    assert (
        "x (ici ring of 4); y (ici ring of 4); z (ici ring of 4)"
        in line(ax, "roof:link:0").get_label()
    )


def test_strategy_points_sit_on_their_roofs() -> None:
    # FSDP on one v5p axis of 4 with its wraparound (as inside a 4x4x4 cube) with 2048 tokens
    # per chip: communication-bound (2048 < 2550), so its collective-traffic point lies on
    # the ICI roof and its attained rate is below C.
    item = fsdp(v5p_with_wraparound(), "4", b=4 * 2048)
    assert item.cost.bottleneck is Bottleneck.COMM
    ax = sr_plot.roofline(plans=[item])
    [x_hbm], [y_hbm] = xy(ax, "strategy:0:hbm")
    [x_comm], [y_comm] = xy(ax, "strategy:0:comm")
    flops = item.cost.flops
    assert y_hbm == y_comm == pytest.approx(flops / item.cost.lower_bound_s)
    assert x_hbm == pytest.approx(flops / item.cost.hbm_bytes)
    # the all-gathered weights: V = 2·D·F bytes
    assert x_comm == pytest.approx(flops / (BF16 * 8192 * 32768))
    assert y_comm == pytest.approx(x_comm * V5P_W_BIDI, rel=1e-6)
    assert y_comm < V5P_PEAK


def test_a_4_chip_v5p_slice_is_a_line_and_its_strategy_sits_on_the_line_roof() -> None:
    # tpus.md: a slice smaller than a 4x4x4 cube has no wraparound, so "4" is a line of 4
    # (1x1x4). An AllGather along a line moves (X-1)/X·V over one direction of the links:
    # the rate in V per second is W_uni·X/(X-1), the ridge C/(W_uni·4/3) = 3825.
    chips = 4
    line_rate = V5P_W_UNI * chips / (chips - 1)
    item = fsdp("tpu-v5p", "4", b=4 * 2048)
    ax = sr_plot.roofline(plans=[item])
    assert _ridges(ax) == pytest.approx([V5P_PEAK / line_rate])
    assert V5P_PEAK / line_rate == pytest.approx(2550 * 2 * 3 / 4)
    assert "x (ici line of 4)" in line(ax, "roof:link:0").get_label()
    [x_comm], [y_comm] = xy(ax, "strategy:0:comm")
    assert x_comm == pytest.approx(item.cost.flops / (BF16 * 8192 * 32768))
    assert y_comm == pytest.approx(x_comm * line_rate, rel=1e-6)


# -- crossover against one dimension -----------------------------------------------------------


def test_crossover_marker_of_fsdp_on_a_v5p_cube_axis_is_the_books_2550_tokens_per_chip() -> None:
    # FSDP over the x ring of a 4x4x4 cube, F split over y+z (Y·Z = 16): per chip
    # T_math = 2BDF/(X·Y·Z·C) and the weights' AllGather over x moves V = 2D(F/16) bytes in
    # V/W_ici (sharding.md); they meet where B/X = C/W_ici, the book's 2550.
    x_size, yz_size = 4, 16
    d, f = 8192, 32768
    alpha = V5P_PEAK / V5P_W_BIDI  # sharding.md: 4.59e14 / 1.8e11
    assert alpha == pytest.approx(2550)
    item = fsdp_in_a_cube()
    assert [c.kind for c in item.collectives] == [Collective.ALL_GATHER]
    assert item.collectives[0].axes == ("x",)
    ax = sr_plot.crossover_sweep(item)
    [x_star], [y_star] = xy(ax, "crossover:0")
    assert x_star / x_size == pytest.approx(alpha, rel=1e-6)
    comm_s = BF16 * d * (f / yz_size) / V5P_W_BIDI
    assert y_star == pytest.approx(comm_s, rel=1e-6)
    chips = x_size * yz_size
    assert y_star == pytest.approx(2 * x_star * d * f / (chips * V5P_PEAK), rel=1e-6)
    # the plotted curves: compute linear in B, communication flat (bandwidth-bound)
    sizes, compute = xy(ax, "sweep:0:compute")
    _, comm = xy(ax, "sweep:0:comm")
    for b, t_math, t_comm in zip(sizes, compute, comm, strict=True):
        assert t_math == pytest.approx(2 * b * d * f / (chips * V5P_PEAK), rel=1e-9)
        assert t_comm == pytest.approx(comm_s, rel=1e-9)
    assert log_interp(sizes, compute, x_star) == pytest.approx(y_star, rel=1e-6)
    assert log_interp(sizes, comm, x_star) == pytest.approx(y_star, rel=1e-6)
    assert x_star == pytest.approx(crossover(item).size)
    assert crossover(item).regime == "bandwidth"
    label = next(t for t in ax.texts if t.get_gid() == "crossover:0:label").get_text()
    assert label == f"B = {x_star:,.0f}"  # bandwidth sets it: no latency remark


@pytest.mark.parametrize(
    ("hardware", "tokens_per_chip"),
    [
        # a real 4-chip v5p slice (1x1x4) is a line: C/(W_uni·X/(X-1)) = 3825 tokens per chip
        pytest.param("tpu-v5p", V5P_PEAK / (V5P_W_UNI * 4 / 3), id="v5p-4-chip-slice-line"),
        # the same axis with its wraparound, as inside a 4x4x4 cube: the book's 2550
        pytest.param(v5p_with_wraparound(), V5P_PEAK / V5P_W_BIDI, id="v5p-axis-with-wrap"),
    ],
)
def test_fsdp_crossover_on_one_v5p_axis_of_4_depends_on_its_wraparound(
    hardware: str | HardwareSpec, tokens_per_chip: float
) -> None:
    chips = 4
    item = fsdp(hardware, "4")
    [x_star], _ = xy(sr_plot.crossover_sweep(item), "crossover:0")
    assert x_star / chips == pytest.approx(tokens_per_chip, rel=1e-6)


def tensor_parallel(d: int = 8192) -> Plan:
    """sharding.md case 3 on one v5p axis of 4 with its wraparound (as inside a 4x4x4 cube):
    A[B, D_x]·B[D_x, F] -> C[B, F] {U_x}, then ReduceScatter C onto B_x."""
    einsum = Einsum.create("bd,df->bf", f"b=4096,d={d},f=32768")
    mesh = DeviceMesh.create(v5p_with_wraparound(), "x=4", "4")
    ranking = plan(einsum, mesh, lhs="None,x", rhs="x,None", out="x,None", top=None)
    item = ranking.find(b="", d="x", f="")
    assert [c.kind for c in item.collectives] == [Collective.REDUCE_SCATTER]
    return item


def test_crossover_over_the_contracting_dimension_is_x_times_alpha() -> None:
    # sharding.md case 3: compute-bound iff D/X > C/W_ici. The sweep over D puts the
    # marker at D = X·2550.
    chips = 4
    item = tensor_parallel()
    ax = sr_plot.crossover_sweep(item, "d")
    [x_star], [y_star] = xy(ax, "crossover:0")
    assert x_star == pytest.approx(chips * V5P_PEAK / V5P_W_BIDI, rel=1e-6)
    # T_comm of the ReduceScatter: V = 2BF bytes of the unreduced output
    assert y_star == pytest.approx(BF16 * 4096 * 32768 / V5P_W_BIDI, rel=1e-6)
    assert "global size of D" in ax.get_xlabel()


def test_a_crossover_set_by_latency_says_so_on_the_plot() -> None:
    # The same strategy with D/X = 4096 > 2550 is compute-bound at any large batch; at a tiny
    # batch the ReduceScatter is latency-bound (sharding.md: T = max(T_min·hops, V/W)) and
    # the crossover along B is where compute reaches the latency: a ring of X needs
    # floor(X/2) hops of ~1 us, so 2·B·D·F/(X·C) = 2 us at B = 2us·X·C/(2DF).
    chips, d, f = 4, 16384, 32768
    latency_s = (chips // 2) * V5P_HOP_S
    b_star = latency_s * chips * V5P_PEAK / (2 * d * f)
    assert BF16 * b_star * f / V5P_W_BIDI < latency_s  # the bandwidth term is smaller there
    item = tensor_parallel(d=d)
    found = crossover(item, "b")
    assert found.regime == "latency"
    ax = sr_plot.crossover_sweep(item, "b")
    [x_star], [y_star] = xy(ax, "crossover:0")
    assert x_star == pytest.approx(b_star, rel=1e-6)
    assert y_star == pytest.approx(latency_s, rel=1e-6)
    label = next(t for t in ax.texts if t.get_gid() == "crossover:0:label").get_text()
    assert label == f"B = {b_star:.3g} (latency-bound)"


def test_crossover_marker_on_an_h100_node_uses_the_ring_over_nvlink() -> None:
    # gpus.md: in-node AllGather T = V·(N-1)/(N·W_egress); T_math = 2BDF/(N·C); NCCL adds
    # its latency, 8.4 us + (N-1) ring steps of 3.4 us (src/graph/tuning.cc)
    gpus, d, f = 8, 8192, 32768
    item = fsdp("h100", "1x8", "x=8")
    ax = sr_plot.crossover_sweep(item)
    [x_star], [y_star] = xy(ax, "crossover:0")
    bandwidth_s = BF16 * d * f * (gpus - 1) / (gpus * H100_NVLINK)
    comm_s = bandwidth_s + 8.4e-6 + (gpus - 1) * 3.4e-6
    tokens_per_gpu = comm_s * H100_PEAK / (2 * d * f)
    book = bandwidth_s * H100_PEAK / (2 * d * f)
    assert book == pytest.approx(2200 * 7 / 8, rel=0.01)  # the book's C/W·(N-1)/N
    assert x_star == pytest.approx(gpus * tokens_per_gpu, rel=1e-6)
    assert y_star == pytest.approx(comm_s, rel=1e-6)


def test_crossover_panels_draw_one_chip_per_axes() -> None:
    panels = {
        "TPU v5p (1x1x4)": [fsdp("tpu-v5p", "4")],
        "H100": [fsdp("h100", "1x8", "x=8")],
    }
    figure = sr_plot.crossover_panels(panels)
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["TPU v5p (1x1x4)", "H100"]
    for ax, items in zip(axes, panels.values(), strict=True):
        [x_star], _ = xy(ax, "crossover:0")
        assert x_star == pytest.approx(crossover(items[0]).size)
    assert figure.legends, "one legend for the whole figure"


def test_sweep_hbm_time_scales_only_the_operands_that_hold_the_letter() -> None:
    # FSDP local einsum on each chip: A[B/X, D] · W[D, F] -> C[B/X, F]
    chips, b, d, f = 4, 16384, 8192, 32768
    item = fsdp("tpu-v5p", "4", b=b)
    sizes = [1024.0, 65536.0]
    times = sr_plot.sweep_times(item, "b", sizes)
    hbm_bytes_per_s = 2.8e12
    for size, hbm_s in zip(sizes, times.hbm_s, strict=True):
        local = BF16 * (size / chips * d + d * f + size / chips * f)
        assert hbm_s == pytest.approx(local / hbm_bytes_per_s, rel=1e-12)
    at_plan_size = sr_plot.sweep_times(item, "b", [float(b)]).hbm_s[0]
    assert at_plan_size == pytest.approx(item.cost.hbm_s, rel=1e-12)


# -- crossover against the mesh size -----------------------------------------------------------


def test_mesh_sweep_marker_sits_where_the_lines_meet() -> None:
    # FSDP with 65,536 tokens on v5p: compute falls as 1/N, the weights' AllGather does not.
    # On the 4x4x4 and 4x4x8 cubes the one axis x spans three wrapped torus dimensions, whose
    # bandwidths add (sharding.md: V/(W_ici·N_axes)), so T_comm = 2DF/(3·W_ici) on both and
    # the lines meet at B/N = C/(3·W_ici), N = 77.1.
    shapes = {8: "2x2x2", 16: "2x2x4", 64: "4x4x4", 128: "4x4x8"}
    series = [fsdp("tpu-v5p", shape, f"x={n}", b=65536) for n, shape in shapes.items()]
    ax = sr_plot.mesh_sweep({"FSDP": series})
    [x_star], [y_star] = xy(ax, "crossover:0")
    xs, compute = xy(ax, "mesh:0:compute")
    _, comm = xy(ax, "mesh:0:comm")
    assert xs == [8, 16, 64, 128]
    for n, t_math in zip(xs, compute, strict=True):
        assert t_math == pytest.approx(2 * 65536 * 8192 * 32768 / (n * V5P_PEAK))
    assert x_star == pytest.approx(65536 * 3 * V5P_W_BIDI / V5P_PEAK, rel=1e-9)
    assert y_star == pytest.approx(BF16 * 8192 * 32768 / (3 * V5P_W_BIDI), rel=1e-9)
    assert log_interp(xs, compute, x_star) == pytest.approx(y_star, rel=1e-9)
    assert log_interp(xs, comm, x_star) == pytest.approx(y_star, rel=1e-9)


# -- collectives against message size ----------------------------------------------------------


def test_collective_sweep_combines_terms_per_link_family() -> None:
    """TPU ICI: the larger of the latency and bandwidth terms (the book); GPU NVLink: their
    sum, with NCCL's base latency (tuning.cc)."""
    v5p = load_preset("tpu-v5p")
    ring = DeviceMesh.create(v5p, "x=4,y=4,z=4", "4x4x4")  # whole cube: wraps
    line_mesh = DeviceMesh.create(v5p, "x=4,y=4,z=2", "4x4x2")  # not whole cubes: no wrap
    node = DeviceMesh.create(load_preset("h100"), "node=4,gpu=8", "4x8")
    cases = [
        sr_plot.CollectiveCase(label="ring", mesh=ring, axes=("x",)),
        sr_plot.CollectiveCase(label="line", mesh=line_mesh, axes=("x",)),
        sr_plot.CollectiveCase(label="in-node", mesh=node, axes=("gpu",)),
    ]
    # (seconds per byte of V, latency): sharding.md ring V/W_bidi over floor(4/2) hops;
    # line (X-1)/X·V/W_uni over X-1 hops; gpus.md V·(N-1)/(N·W) over N-1 NCCL ring steps.
    expected = [
        (1 / V5P_W_BIDI, 2 * 1 * US),
        (3 / (4 * V5P_W_UNI), 3 * 1 * US),
        (7 / (8 * H100_NVLINK), 8.4 * US + 7 * 3.4 * US),
    ]
    adds = [False, False, True]
    ax = sr_plot.collective_sweep(cases, array_bytes=[1e3, 1e5, 1e7, 1e9])
    for index, (s_per_byte, latency_s) in enumerate(expected):
        volumes, total = xy(ax, f"collective:{index}:total")
        _, latency = xy(ax, f"collective:{index}:latency")
        _, bandwidth = xy(ax, f"collective:{index}:bandwidth")
        for v, t, lat, bw in zip(volumes, total, latency, bandwidth, strict=True):
            assert bw == pytest.approx(v * s_per_byte, rel=1e-9)
            assert lat == pytest.approx(latency_s, rel=1e-9)
            assert t == pytest.approx(lat + bw if adds[index] else max(lat, bw), rel=1e-12)
        [knee_v], [knee_t] = xy(ax, f"collective:{index}:knee")
        assert knee_v == pytest.approx(latency_s / s_per_byte, rel=1e-6)
        assert knee_t == pytest.approx(latency_s, rel=1e-9)
    # losing the wraparound costs 1.5x at X=4 here (book: "typically doubles")
    ring_bw, line_bw = xy(ax, "collective:0:bandwidth")[1], xy(ax, "collective:1:bandwidth")[1]
    assert line_bw[-1] / ring_bw[-1] == pytest.approx(1.5, rel=1e-6)


def test_collective_curve_rounds_reduce_scatter_to_whole_shards() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    case = sr_plot.CollectiveCase(
        label="rs", mesh=mesh, axes=("x",), kind=Collective.REDUCE_SCATTER
    )
    costs = sr_plot.collective_curve(case, [10.0, 1e6])
    assert [c.elements_in_per_chip % 4 for c in costs] == [0, 0]
    assert costs[1].group_bytes == pytest.approx(1e6, rel=1e-3)


# -- strategy breakdown ------------------------------------------------------------------------


def _bars(ax: Axes, row: int) -> dict[str, Rectangle]:
    prefix = f"bar:{row}:"
    return {
        str(p.get_gid())[len(prefix) :]: p
        for p in ax.patches
        if isinstance(p, Rectangle) and str(p.get_gid()).startswith(prefix)
    }


@pytest.mark.parametrize("overlap", [Overlap.FULL, Overlap.NONE])
def test_breakdown_bars_sum_to_the_plans_times(overlap: Overlap) -> None:
    einsum = Einsum.create("bd,df->bf", "b=8192,d=8192,f=32768")
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=4", "4")
    ranking = plan(einsum, mesh, lhs="x,None", rhs="x,None", out="x,None", top=None)
    ax = sr_plot.breakdown(ranking, overlap=overlap)
    assert "(ms)" in ax.get_xlabel()
    scale = 1e3
    for row, item in enumerate(ranking.strategies):
        bars = _bars(ax, row)
        assert bars["compute"].get_width() == pytest.approx(item.cost.compute_s * scale)
        assert bars["HBM"].get_width() == pytest.approx(item.cost.hbm_s * scale)
        total = sum(bar.get_width() for bar in bars.values())
        assert total == pytest.approx(item.cost.upper_bound_s * scale, rel=1e-12)
        comm = sum(w.get_width() for k, w in bars.items() if k not in ("compute", "HBM"))
        assert comm == pytest.approx(item.cost.comm_s * scale, rel=1e-12)
        [tick], _ = xy(ax, f"estimate:{row}")
        assert tick == pytest.approx(item.cost.time_s(overlap) * scale)
        hatched = {k for k, bar in bars.items() if bar.get_hatch()}
        if item.cost.bottleneck is Bottleneck.COMPUTE:
            assert hatched == {"compute"}
        elif item.cost.bottleneck is Bottleneck.COMM:
            assert hatched == set(bars) - {"compute", "HBM"}


def test_save_breakdown_keeps_the_cli_signature(tmp_path: Path) -> None:
    item = fsdp("tpu-v5p", "4")
    out = sr_plot.save_breakdown([item], tmp_path / "b.png", overlap=Overlap.NONE)
    assert out.read_bytes().startswith(b"\x89PNG")


# -- figures, files and notebooks --------------------------------------------------------------


def test_functions_draw_on_a_given_axes() -> None:
    ax = sr_plot.new_axes()
    item = fsdp("tpu-v5p", "4")
    assert sr_plot.roofline(plans=[item], ax=ax) is ax
    for draw in (sr_plot.crossover_sweep, sr_plot.breakdown):
        given = sr_plot.new_axes()
        assert draw([item], ax=given) is given


def test_inline_figures_render_to_png_deterministically() -> None:
    # what a notebook cell shows; two fresh figures give the same bytes (no timestamps)
    figure = sr_plot.roofline("tpu-v5e").figure
    assert isinstance(figure, sr_plot.InlineFigure)
    first = figure._repr_png_()
    assert first.startswith(b"\x89PNG")
    assert sr_plot.roofline("tpu-v5e").figure._repr_png_() == first


def test_roofline_without_anything_to_draw_says_what_to_pass() -> None:
    with pytest.raises(SpecError, match=r"pass hardware .* a mesh, or plans"):
        sr_plot.roofline()


def test_save_demo_figures_writes_pngs(tmp_path: Path) -> None:
    einsum = Einsum.create("bd,df->bf", "b=8192,d=8192,f=32768")
    mesh = DeviceMesh.create(load_preset("h100"), "x=2,y=4", "1x8")
    paths = sr_plot.save_demo_figures({"one H100 node": plan(einsum, mesh, top=4)}, tmp_path)
    names = sorted(p.name for p in paths)
    assert "one-h100-node_breakdown.png" in names
    assert "one-h100-node_roofline.png" in names
    assert "collectives.png" in names
    assert "chips_crossover.png" in names
    for path in paths:
        assert path.parent == tmp_path
        assert path.read_bytes().startswith(b"\x89PNG")


def test_plotting_never_imports_pyplot() -> None:
    code = (
        "import sys; from sharding_roofline import plot; "
        "plot.roofline('h100'); plot.chip_comparison(); "
        "sys.exit('matplotlib.pyplot' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=False)
    assert result.returncode == 0, result.stderr.decode()


# -- hundreds of strategies ------------------------------------------------------------------


def _many() -> tuple[list[Plan], DeviceMesh]:
    """Every strategy of a matmul on a v5e 4x4 (x and y are both lines of 4: symmetric)."""
    einsum = Einsum.create("bd,df->bf", "b=8192,d=8192,f=32768")
    mesh = DeviceMesh.create(load_preset("tpu-v5e"), "x=4,y=4", "4x4")
    return list(plan(einsum, mesh, top=None).strategies), mesh


def test_symmetric_strategies_merge_into_one_row_with_a_count() -> None:
    strategies, _ = _many()
    rows = sr_plot.merge_symmetric(strategies)
    assert len(rows) < len(strategies)
    assert sum(count for _, count in rows) == len(strategies)
    for item, count in rows:
        twins = [p for p in strategies if sr_plot.symmetry_key(p) == sr_plot.symmetry_key(item)]
        assert len(twins) == count
        for twin in twins:  # the same cost, really: merging hides nothing
            assert twin.cost.compute_s == pytest.approx(item.cost.compute_s, rel=1e-12)
            assert twin.cost.comm_s == pytest.approx(item.cost.comm_s, rel=1e-12)
            assert twin.cost.hbm_s == pytest.approx(item.cost.hbm_s, rel=1e-12)
    assert any(count > 1 for _, count in rows)


def test_breakdown_of_hundreds_of_strategies_shows_the_top_distinct_ones() -> None:
    strategies, _ = _many()
    ax = sr_plot.breakdown(strategies, top=8)
    rows = sr_plot.merge_symmetric(strategies)[:8]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 8
    for row, (label, (item, count)) in enumerate(zip(labels, rows, strict=True)):
        assert label.startswith(f"#{row + 1}  ")
        assert label.endswith(f"(x{count} by symmetry)") == (count > 1)
        [tick], _ = xy(ax, f"estimate:{row}")
        assert tick * 1e-3 == pytest.approx(item.cost.time_s(Overlap.FULL), rel=1e-9)
    title = ax.get_title()
    assert "bd,df->bf (b=8192,d=8192,f=32768) bfloat16 on tpu-v5e x=4,y=4" in title
    assert f"8 of {len(sr_plot.merge_symmetric(strategies))} distinct strategies" in title
    assert f"{len(strategies)} before merging" in title


def test_roofline_labels_only_the_top_strategies() -> None:
    strategies, _ = _many()
    ax = sr_plot.roofline(plans=strategies, top=3)
    drawn = [a.get_gid() for a in ax.get_lines() if str(a.get_gid()).startswith("strategy:")]
    drawn = [gid for gid in drawn if str(gid).endswith(":hbm")]
    assert drawn == ["strategy:0:hbm", "strategy:1:hbm", "strategy:2:hbm"]
    assert "bd,df->bf" in ax.get_title()
    assert f"best 3 of {len(strategies)}" in ax.get_title()


def test_crossover_labels_never_overlap() -> None:
    """Strategies whose crossovers lie close together get one label row each."""
    einsum = Einsum.create("bd,df->bf", "b=65536,d=8192,f=32768")
    talking = []
    for preset, topology in (("tpu-v5e", "2x4"), ("tpu-v5p", "2x2x2"), ("h100", "1x8")):
        mesh = DeviceMesh.create(load_preset(preset), "x=8", topology)
        fsdp = plan(einsum, mesh, lhs="x,None", rhs="x,None", out="x,None", top=None)
        talking.append(fsdp.find(b="x", d="", f=""))
    assert all(crossover(p).size is not None for p in talking)
    ax = sr_plot.crossover_sweep(talking)
    labels = [t for t in ax.texts if str(t.get_gid()).endswith(":label")]
    assert len(labels) >= 2
    rows = sorted(t.xyann[1] for t in labels)
    gaps = [b - a for a, b in itertools.pairwise(rows)]
    assert min(gaps) == pytest.approx(sr_plot.sweeps.LABEL_STEP)
    assert "bd,df->bf" in ax.get_title()


def test_saved_legends_are_not_clipped(tmp_path: Path) -> None:
    """The legend sits outside the Axes; the saved figure's tight box must contain it."""
    strategies, _ = _many()
    ax = sr_plot.breakdown(strategies[:3])
    figure = sr_plot.figure_of(ax)
    renderer = FigureCanvasAgg(figure).get_renderer()
    legend = ax.get_legend().get_window_extent(renderer)
    tight = figure.get_tightbbox(renderer).transformed(figure.dpi_scale_trans)
    assert tight.x1 >= legend.x1 - 1
    sr_plot.save_breakdown(strategies[:3], tmp_path / "b.pdf")
    assert (tmp_path / "b.pdf").read_bytes().startswith(b"%PDF")
