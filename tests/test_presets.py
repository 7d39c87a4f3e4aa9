"""Shipped hardware presets: every one loads, its numbers are plausible and sourced, the
book's critical intensities come out of it, and the loader rejects bad files loudly."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import pytest

from sharding_roofline.errors import ConfigError, TopologyError, UnknownNameError
from sharding_roofline.hardware import ChipSpec, HardwareKind, HardwareSpec
from sharding_roofline.mesh import DeviceMesh
from sharding_roofline.presets import list_presets, load_preset
from sharding_roofline.topology import Topology

REQUIRED_PRESETS = (
    "tpu-v4p",
    "tpu-v5e",
    "tpu-v5p",
    "tpu-v6e",
    "tpu-7x",
    "h100",
    "h200",
    "b200",
    "gb200-nvl72",
)

# Plausible ranges in base units. A figure typed in TFLOP/s, GB/s, GB or us falls far outside.
BF16_FLOPS_PER_S = (1e13, 1e16)
ANY_DTYPE_FLOPS_PER_S = (1e12, 1e17)
HBM_BYTES_PER_S = (1e11, 2e13)
HBM_CAPACITY_BYTES = (4e9, 4e11)
LINK_BYTES_PER_S = (1e9, 2e12)
LATENCY_S = (1e-7, 1e-3)


def _in_range(value: float, bounds: tuple[float, float]) -> bool:
    low, high = bounds
    return low <= value <= high


def _link_figures(spec: HardwareSpec) -> dict[str, tuple[float, float]]:
    """Every link of a preset: name -> (bytes/s per direction, latency in seconds)."""
    links: dict[str, tuple[float, float]] = {}
    if spec.ici is not None:
        links["ici"] = (spec.ici.link_bytes_per_s_per_direction, spec.ici.hop_latency_s)
    if spec.nvlink is not None:
        links["nvlink"] = (spec.nvlink.bytes_per_s_per_gpu_per_direction, spec.nvlink.latency_s)
    for level in spec.scale_out:
        links[f"scale_out {level.name}"] = (
            level.bytes_per_s_per_chip_per_direction,
            level.latency_s,
        )
    return links


# --------------------------------------------------------------------------------------
# Every shipped preset


def test_required_presets_are_shipped() -> None:
    missing = sorted(set(REQUIRED_PRESETS) - set(list_presets()))
    assert not missing, f"presets not shipped: {missing}"


def test_list_presets_is_sorted() -> None:
    names = list_presets()
    assert names == sorted(names)


@pytest.mark.parametrize("name", list_presets())
def test_preset_loads_and_names_itself(name: str) -> None:
    spec = load_preset(name)
    assert isinstance(spec, HardwareSpec)
    assert spec.name == name, "the preset's name key must match its file name"
    assert spec.description.strip()
    if spec.kind is HardwareKind.TPU:
        assert spec.ici is not None
        assert spec.nvlink is None
        assert [level.link.value for level in spec.scale_out] == ["dcn"]
    else:
        assert spec.nvlink is not None
        assert spec.ici is None
        assert spec.scale_out, "a GPU preset needs the fabric above its NVLink domain"
        assert {level.link.value for level in spec.scale_out} == {"infiniband"}


@pytest.mark.parametrize("name", list_presets())
def test_preset_chip_numbers_are_plausible(name: str) -> None:
    chip = load_preset(name).chip
    bf16 = chip.peak_flops_per_s_for("bfloat16")
    assert _in_range(bf16, BF16_FLOPS_PER_S), f"bf16 peak {bf16:g} FLOPs/s"
    for dtype, rate in chip.peak_flops_per_s.items():
        assert _in_range(rate, ANY_DTYPE_FLOPS_PER_S), f"{dtype} peak {rate:g} FLOPs/s"
    assert _in_range(chip.hbm_bytes_per_s, HBM_BYTES_PER_S), f"HBM {chip.hbm_bytes_per_s:g} B/s"
    assert _in_range(chip.hbm_capacity_bytes, HBM_CAPACITY_BYTES), (
        f"HBM capacity {chip.hbm_capacity_bytes:g} bytes"
    )


@pytest.mark.parametrize("name", list_presets())
def test_preset_link_numbers_are_plausible(name: str) -> None:
    links = _link_figures(load_preset(name))
    assert links
    for link, (bytes_per_s, latency_s) in links.items():
        assert _in_range(bytes_per_s, LINK_BYTES_PER_S), f"{link}: {bytes_per_s:g} B/s"
        assert _in_range(latency_s, LATENCY_S), f"{link}: latency {latency_s:g} s"


@pytest.mark.parametrize("name", list_presets())
def test_preset_links_get_slower_going_out(name: str) -> None:
    """ICI/NVLink is faster per chip than the fabric above it, and no faster than HBM."""
    spec = load_preset(name)
    inner_bytes_per_s, inner_latency_s = _link_figures(spec)["ici" if spec.ici else "nvlink"]
    assert inner_bytes_per_s < spec.chip.hbm_bytes_per_s
    for level in spec.scale_out:
        assert level.bytes_per_s_per_chip_per_direction < inner_bytes_per_s
        assert level.latency_s > inner_latency_s


@pytest.mark.parametrize("name", list_presets())
def test_preset_sections_name_their_sources(name: str) -> None:
    spec = load_preset(name)
    sources = {"chip": spec.chip.source}
    if spec.ici is not None:
        sources["ici"] = spec.ici.source
    if spec.nvlink is not None:
        sources["nvlink"] = spec.nvlink.source
    for level in spec.scale_out:
        sources[f"scale_out {level.name}"] = level.source
    for section, source in sources.items():
        assert source.strip(), f"{name}: [{section}] has an empty source"


@pytest.mark.parametrize("name", [n for n in list_presets() if n.startswith("tpu-")])
def test_tpu_presets_list_no_float32_peak(name: str) -> None:
    """The book and Google give TPU peaks for bf16/int8 (and fp8) only."""
    assert "float32" not in load_preset(name).chip.peak_flops_per_s


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.startswith("tpu-")])
def test_gpu_nccl_latencies(name: str) -> None:
    """NCCL v2.30.7 tuning.cc, Ring/Simple: hwLat NVLINK 3.4 us, hwLat NET 14 us."""
    spec = load_preset(name)
    assert spec.nvlink is not None
    assert spec.nvlink.latency_s == pytest.approx(3.4e-6)
    for level in spec.scale_out:
        assert level.latency_s == pytest.approx(14e-6)


def test_shipped_preset_by_path_equals_by_name() -> None:
    with resources.as_file(
        resources.files("sharding_roofline") / "presets" / "tpu-v5e.toml"
    ) as path:
        by_path = load_preset(path)
    assert by_path == load_preset("tpu-v5e")
    assert by_path.path.endswith("tpu-v5e.toml")


# --------------------------------------------------------------------------------------
# The book's numbers, computed here from the book's inputs and compared with the presets


@pytest.mark.parametrize(
    ("name", "dtype", "book_flops_per_s", "book_hbm_bytes_per_s", "book_answer"),
    [
        pytest.param("tpu-v5e", "bfloat16", 1.97e14, 8.2e11, 240, id="v5e-bf16-240"),
        pytest.param("tpu-v5e", "int8", 3.94e14, 8.2e11, 480, id="v5e-int8-480"),
        pytest.param("h100", "bfloat16", 9.89e14, 3.35e12, 295, id="h100-bf16-295"),
        pytest.param("b200", "bfloat16", 2.25e15, 8e12, 281, id="b200-bf16-281"),
    ],
)
def test_critical_intensity_matches_the_book(
    name: str,
    dtype: str,
    book_flops_per_s: float,
    book_hbm_bytes_per_s: float,
    book_answer: float,
) -> None:
    book_intensity = book_flops_per_s / book_hbm_bytes_per_s
    assert book_intensity == pytest.approx(book_answer, rel=5e-3)  # the book rounds
    chip = load_preset(name).chip
    assert chip.critical_intensity_flops_per_byte(dtype) == pytest.approx(book_intensity, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "book_link_bytes_per_s_per_direction"),
    [
        pytest.param("tpu-v4p", 4.5e10, id="v4p"),
        pytest.param("tpu-v5e", 4.5e10, id="v5e"),
        pytest.param("tpu-v5p", 9e10, id="v5p"),
        pytest.param("tpu-v6e", 9e10, id="v6e"),
        pytest.param("tpu-7x", 9e10, id="7x"),
    ],
)
def test_tpu_ici_matches_the_book(name: str, book_link_bytes_per_s_per_direction: float) -> None:
    ici = load_preset(name).ici
    assert ici is not None
    assert ici.link_bytes_per_s_per_direction == book_link_bytes_per_s_per_direction
    assert ici.hop_latency_s == pytest.approx(1e-6)


def test_v5p_ici_critical_intensity_matches_the_book() -> None:
    """sharding.md: C / W_ici = 4.59e14 / 1.8e11 = 2550 per axis, bidirectional."""
    spec = load_preset("tpu-v5p")
    assert spec.ici is not None
    intensity = spec.chip.peak_flops_per_s_for("bf16") / spec.ici.link_bytes_per_s_bidirectional
    assert intensity == pytest.approx(2550, rel=1e-3)


@pytest.mark.parametrize(
    ("name", "book_node_egress_bytes_per_s"),
    [
        pytest.param("h100", 400e9, id="h100"),
        pytest.param("b200", 400e9, id="b200"),
        pytest.param("gb200-nvl72", 3600e9, id="gb200-nvl72"),
    ],
)
def test_gpu_node_egress_matches_the_book(name: str, book_node_egress_bytes_per_s: float) -> None:
    """gpus.md: node egress = GPUs in the NVLink domain x per-GPU NIC bandwidth."""
    spec = load_preset(name)
    assert spec.nvlink is not None
    leaf = spec.scale_out[0]
    egress = spec.nvlink.gpus_per_domain * leaf.bytes_per_s_per_chip_per_direction
    assert egress == pytest.approx(book_node_egress_bytes_per_s)


# --------------------------------------------------------------------------------------
# Torus wraparound rules (tpus.md)


@pytest.mark.parametrize(
    ("name", "shape", "expected"),
    [
        pytest.param("tpu-v5e", (4, 4), (False, False), id="v5e-4x4-none"),
        pytest.param("tpu-v5e", (8, 16), (False, True), id="v5e-8x16-only-16"),
        pytest.param("tpu-v5e", (16, 16), (True, True), id="v5e-16x16-both"),
        pytest.param("tpu-v5p", (4, 4, 4), (True, True, True), id="v5p-4x4x4-all"),
        pytest.param("tpu-v5p", (4, 4, 8), (True, True, True), id="v5p-4x4x8-all"),
        pytest.param("tpu-v5p", (2, 2, 4), (False, False, False), id="v5p-2x2x4-none"),
        pytest.param("tpu-v5p", (2, 4, 4), (False, False, False), id="v5p-2x4x4-none"),
    ],
)
def test_wraparound(name: str, shape: tuple[int, ...], expected: tuple[bool, ...]) -> None:
    ici = load_preset(name).ici
    assert ici is not None
    assert ici.wraps(shape) == expected


# --------------------------------------------------------------------------------------
# Strict loading of user files

VALID_TOML = """\
name = "my-tpu"
description = "a test chip"
kind = "tpu"

[chip]
name = "Test TPU"
hbm_capacity_bytes = 16e9
hbm_bytes_per_s = 8.2e11
source = "test"

[chip.peak_flops_per_s]
bfloat16 = 1.97e14

[ici]
link_bytes_per_s_per_direction = 4.5e10
num_torus_dims = 2
max_shape = [16, 16]
wraparound = "full-axis"
hop_latency_s = 1e-6
source = "test"
"""


def _write(tmp_path: Path, filename: str, text: str) -> Path:
    path = tmp_path / filename
    path.write_text(text, encoding="utf-8")
    return path


def _replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once in the base TOML"
    return text.replace(old, new)


def test_valid_user_file_loads(tmp_path: Path) -> None:
    path = _write(tmp_path, "mine.toml", VALID_TOML)
    spec = load_preset(path)
    assert spec.name == "my-tpu"
    assert spec.chip.critical_intensity_flops_per_byte() == pytest.approx(1.97e14 / 8.2e11)
    assert spec.path == str(path.resolve())
    assert spec.scale_out == ()


def test_unknown_key_names_file_table_and_valid_keys(tmp_path: Path) -> None:
    text = _replace_once(VALID_TOML, "hbm_bytes_per_s = 8.2e11", "hbm_bw = 8.2e11")
    path = _write(tmp_path, "unknown_key.toml", text)
    expected = (
        "unknown_key.toml: [chip]: unknown key 'hbm_bw'; expected one of "
        "hbm_bytes_per_s, hbm_capacity_bytes, name, peak_flops_per_s, source"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_preset(path)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = _write(
        tmp_path, "top.toml", VALID_TOML.replace('kind = "tpu"', 'kind = "tpu"\nvendor = "x"')
    )
    with pytest.raises(
        ConfigError, match=r"top\.toml: unknown key 'vendor'; expected one of .*chip"
    ):
        load_preset(path)


def test_missing_key_is_named(tmp_path: Path) -> None:
    text = _replace_once(VALID_TOML, "hbm_bytes_per_s = 8.2e11\n", "")
    path = _write(tmp_path, "missing_key.toml", text)
    with pytest.raises(
        ConfigError, match=re.escape("missing_key.toml: [chip]: missing key 'hbm_bytes_per_s'")
    ):
        load_preset(path)


def test_quoted_number_says_expected_a_number(tmp_path: Path) -> None:
    text = _replace_once(VALID_TOML, "hbm_bytes_per_s = 8.2e11", 'hbm_bytes_per_s = "8.2e11"')
    path = _write(tmp_path, "quoted.toml", text)
    expected = (
        "quoted.toml: chip.hbm_bytes_per_s: expected a number, got '8.2e11' "
        "(write numbers without quotes"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_preset(path)


def test_quoted_peak_rate_says_expected_a_number(tmp_path: Path) -> None:
    text = _replace_once(VALID_TOML, "bfloat16 = 1.97e14", 'bfloat16 = "1.97e14"')
    path = _write(tmp_path, "quoted_peak.toml", text)
    with pytest.raises(ConfigError, match=r"peak_flops_per_s\.bfloat16: expected a number"):
        load_preset(path)


def test_unknown_wraparound_lists_valid_values(tmp_path: Path) -> None:
    text = _replace_once(VALID_TOML, '"full-axis"', '"sometimes"')
    path = _write(tmp_path, "wrap.toml", text)
    expected = (
        "wrap.toml: ici.wraparound: 'sometimes' is not one of "
        "'full-axis', 'full-cubes', 'always', 'never'"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_preset(path)


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.toml", VALID_TOML + '\n[chip\nname = "unterminated\n')
    with pytest.raises(ConfigError, match=re.escape("broken.toml: not valid TOML")):
        load_preset(path)


def test_tpu_without_ici_is_rejected(tmp_path: Path) -> None:
    text = VALID_TOML[: VALID_TOML.index("[ici]")]
    path = _write(tmp_path, "no_ici.toml", text)
    with pytest.raises(ConfigError, match=r"no_ici\.toml: .*needs an \[ici\] table"):
        load_preset(path)


def test_unknown_preset_name_lists_shipped_ones() -> None:
    shipped = ", ".join(list_presets())
    expected = f"unknown hardware preset 'tpu-v9'; shipped presets are {shipped}"
    with pytest.raises(UnknownNameError, match=re.escape(expected)):
        load_preset("tpu-v9")


def test_missing_path_says_it_does_not_exist(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(UnknownNameError, match=r"nowhere\.toml' does not exist"):
        load_preset(path)


# --------------------------------------------------------------------------------------
# What a new user hits first: real slices, capacities in the vendor's units, TF32


@pytest.mark.parametrize("shape", ["4x8x8", "8x8x8", "4x4x4", "4x4x576", "12x12x64", "2x2x1"])
def test_tpu7x_accepts_real_slices_of_whole_cubes(shape: str) -> None:
    """TPU7x slices are whole 4x4x4 cubes (every axis a multiple of 4) up to 144 cubes."""
    topology = Topology.build(load_preset("tpu-7x"), shape)
    assert topology.shape_text == shape


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        pytest.param(
            "4x4x6", r"every axis must be a multiple of 4 \(got 6\); use e\.g\. 4x4x8", id="4x4x6"
        ),
        pytest.param("4x4x580", r"145 cubes .* more than the 144 \(9216 chips\)", id="145-cubes"),
        pytest.param("4x4x5x4", r"3D torus", id="four-axes"),
    ],
)
def test_tpu7x_rejects_what_is_not_a_slice(shape: str, message: str) -> None:
    with pytest.raises(TopologyError, match=message):
        Topology.build(load_preset("tpu-7x"), shape)


def test_tpu7x_mesh_on_an_8x8x8_slice() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-7x"), "x=8,y=8,z=8")
    assert mesh.num_devices == 512
    assert all(dim.wraps for dim in mesh.topology.dims)  # whole cubes wrap


@pytest.mark.parametrize(
    ("name", "capacity_bytes", "unit"),
    [
        pytest.param("tpu-v4p", 32 * 2**30, "32 GiB", id="v4p-32GiB"),
        pytest.param("tpu-v5e", 16 * 2**30, "16 GiB", id="v5e-16GiB"),
        pytest.param("tpu-v5p", 95 * 2**30, "95 GiB", id="v5p-95GiB"),
        pytest.param("tpu-v6e", 32 * 2**30, "32 x 2^30", id="v6e-32GiB"),
        pytest.param("tpu-7x", 192 * 2**30, "192 GiB", id="7x-192GiB"),
        pytest.param("h100", 81559 * 2**20, "81,559 MiB", id="h100-usable"),
        pytest.param("h200", 143771 * 2**20, "143,771 MiB", id="h200-usable"),
        pytest.param("b200", 183359 * 2**20, "183,359 MiB", id="b200-usable"),
        pytest.param("gb200-nvl72", 189471 * 2**20, "189,471 MiB", id="gb200-usable"),
    ],
)
def test_hbm_capacity_is_stored_in_bytes_exactly(name: str, capacity_bytes: int, unit: str) -> None:
    """Vendors write GB where they mean GiB (TPU) or the usable NVML figure (GPU): the preset
    stores the exact bytes and its source names the unit it read."""
    chip = load_preset(name).chip
    assert chip.hbm_capacity_bytes == capacity_bytes
    assert unit in chip.source


@pytest.mark.parametrize("name", ["h100", "h200", "b200", "gb200-nvl72"])
def test_gpu_float32_is_the_tf32_tensor_rate(name: str) -> None:
    """JAX runs float32 matmuls in TF32 on these GPUs by default: ``float32`` is the TF32
    tensor-core dense rate, and the CUDA-core FP32 rate is ``vector_flops_per_s.float32``."""
    chip = load_preset(name).chip
    tf32 = chip.peak_flops_per_s_for("float32")
    vector = chip.vector_flops_per_s["float32"]
    assert tf32 == pytest.approx(chip.peak_flops_per_s_for("bfloat16") / 2, rel=0.03)
    assert 5 < tf32 / vector < 20
    assert "TF32" in chip.source
    assert "vector_flops_per_s.float32" in chip.source


def test_vector_rates_are_validated_like_peaks() -> None:
    with pytest.raises(ConfigError, match=r"vector_flops_per_s key 'fp32' is an alias"):
        ChipSpec(
            name="c",
            peak_flops_per_s={"bfloat16": 1e14},
            vector_flops_per_s={"fp32": 1e13},
            hbm_bytes_per_s=1e12,
            hbm_capacity_bytes=1e10,
            source="test",
        )
