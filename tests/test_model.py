"""Whole models in training: configs, FLOPs, MFU, microbatches, pipelines, memory, the
model command's JSON and the layout search's invariants. Expected values come from the
formulas written out here (the book's 6·params per token, the pipeline bubble
(P-1)/(v·m+P-1), ...), never from the tool's own output."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from sharding_roofline import (
    ConfigError,
    DeviceMesh,
    Topology,
    Training,
    load_model_config,
    load_preset,
    plan_model,
    search_model,
)
from sharding_roofline.cli import main
from sharding_roofline.plans import Rejected
from sharding_roofline.program import model_search
from sharding_roofline.program.autodiff import Remat
from sharding_roofline.program.config import ModelConfig, from_hf
from sharding_roofline.program.model import Schedule, model_flops

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"


def tiny(**changes: object) -> ModelConfig:
    """A 4-layer GQA model small enough to plan in milliseconds."""
    fields: dict[str, object] = {
        "name": "tiny", "d": 256, "f": 1024, "n": 8, "k": 2, "h": 32, "layers": 4,
        "vocab": 1024, "seq_len": 128,
    }  # fmt: skip
    fields.update(changes)
    return ModelConfig(**fields)  # type: ignore[arg-type]


# -- configs ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_model_config_loads_and_names_its_source(path: Path) -> None:
    config = load_model_config(path)
    assert config.source, f"{path.name} has no source"
    if path.stem.startswith("tiny-"):  # toys for model --validate: small enough to compile
        assert "not a published model" in config.source
        assert config.params()["total"] < 1e5
    else:
        assert config.params()["total"] > 1e9


def test_llama3_70b_parameter_count_is_the_books() -> None:
    """applied-training.md: 56.3e9 FFW + 2.1e9 vocab + 12e9 attention = 70.4e9 (+ norms)."""
    c = load_model_config(MODELS / "llama3-70b.toml")
    ffw = 3 * c.d * c.f * c.layers
    vocab = 2 * c.vocab * c.d
    attention = c.layers * (2 * c.d * c.n * c.h + 2 * c.d * c.k * c.h)
    norms = (2 * c.layers + 1) * c.d
    assert c.params()["total"] == ffw + vocab + attention + norms
    # the book's rounded parts (56.3 + 2.1 + 12 = 70.4; unrounded they add to 70.55)
    assert (ffw / 1e9, vocab / 1e9, attention / 1e9) == pytest.approx((56.3, 2.1, 12.0), abs=0.1)


def test_a_hugging_face_config_json_is_read_with_its_own_field_names(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
                "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
                "rope_theta": 500000.0, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
            }
        ),
        encoding="utf-8",
    )  # fmt: skip
    config = load_model_config(path)
    assert (config.d, config.f, config.n, config.k, config.layers) == (4096, 14336, 32, 8, 32)
    assert config.h == 4096 // 32  # head_dim defaults to hidden_size / heads
    assert config.ignored == ("rope_theta", "torch_dtype")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"hidden_sise": 8}, "unknown field 'hidden_sise'"),
        ({"num_local_experts": 8, "n_routed_experts": 16}, "contradicts another field"),
        ({"num_key_value_heads": 3}, "must divide num_attention_heads"),
        ({"num_experts_per_tok": 2}, "without experts"),
        ({"num_local_experts": 4, "num_experts_per_tok": 5}, "between 1 and the 4 experts"),
        ({"hidden_size": "4096"}, "hidden_size = '4096' must be a whole number"),
    ],
)
def test_bad_model_configs_name_the_field(fields: dict[str, object], message: str) -> None:
    base = {
        "hidden_size": 512, "intermediate_size": 2048, "num_attention_heads": 8,
        "num_hidden_layers": 2, "vocab_size": 1000,
    }  # fmt: skip
    with pytest.raises(ConfigError, match=message):
        from_hf({**base, **fields})


def test_a_missing_config_file_says_what_to_give() -> None:
    with pytest.raises(ConfigError, match=r"is not a file; give a \.toml or config\.json path"):
        load_model_config("/nonexistent/config.json")


# -- FLOPs and MFU ----------------------------------------------------------------------


@pytest.mark.parametrize("remat", [Remat.NONE, Remat.FULL])
@pytest.mark.parametrize("attention", ["flash", "materialized"])
def test_model_flops_are_six_per_matmul_parameter_plus_attention(
    remat: Remat, attention: str
) -> None:
    """6 FLOPs per matmul parameter per token (the embedding is a gather, the norms are not
    matmuls) plus QK^T and AV, 2·2·T·N·H per token per layer forward and twice that
    backward; recomputation (remat, flash's backward) is not model FLOPs."""
    config = tiny(attention=attention)
    tokens, seq = 4096, config.seq_len
    got = model_flops(config, Training(batch_tokens=tokens, seq_len=seq, remat=remat))
    params = config.params()
    matmul = params["total"] - params["embedding"] - (2 * config.layers + 1) * config.d
    attention_flops = 3 * 4 * seq * config.n * config.h * config.layers
    assert got == pytest.approx((6 * matmul + attention_flops) * tokens, rel=1e-12)


def test_mfu_is_model_flops_over_step_chips_and_peak() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=2,y=2,z=2", "2x2x2")
    plan = plan_model(tiny(), mesh, "fsdp=x+y,sp=z", Training(batch_tokens=2048, seq_len=128))
    assert not isinstance(plan, Rejected)
    peak = 4.59e14  # v5p bf16 (the book's C)
    assert plan.mfu == pytest.approx(plan.model_flops / (plan.step_lower_s * 8 * peak))
    assert plan.tokens_per_s_per_chip == pytest.approx(2048 / plan.step_lower_s / 8)
    assert plan.step_lower_s <= plan.step_upper_s
    assert plan.step_lower_s >= plan.model_flops / (8 * peak)


# -- microbatches and pipelines ---------------------------------------------------------


def _plan(strategy: str, mesh_text: str, topology: str, **training: object) -> object:
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), mesh_text, topology)
    fields: dict[str, object] = {"batch_tokens": 8192, "seq_len": 128}
    fields.update(training)
    plan = plan_model(tiny(), mesh, strategy, Training(**fields))  # type: ignore[arg-type]
    assert not isinstance(plan, Rejected), plan
    return plan


@pytest.mark.parametrize(
    ("schedule", "virtual", "microbatches"),
    [(Schedule.GPIPE, 1, 8), (Schedule.ONE_F_ONE_B, 1, 8), (Schedule.INTERLEAVED, 2, 8)],
)
def test_pipeline_bubble_and_activations_in_flight(
    schedule: Schedule, virtual: int, microbatches: int
) -> None:
    """P stages, m microbatches, v chunks per device: bubble (P-1)/(v·m+P-1); GPipe keeps
    all m microbatches' activations, 1F1B (and interleaved) at most P."""
    plan = _plan(
        "dp=x,pp=z", "x=2,y=1,z=4", "2x1x4",
        microbatches=microbatches, schedule=schedule, virtual_stages=virtual,
    )  # fmt: skip
    pipe = plan.pipeline  # type: ignore[attr-defined]
    stages = 4
    assert pipe.stages == stages
    assert pipe.bubble_fraction == pytest.approx((stages - 1) / (virtual * microbatches + 3))
    assert pipe.in_flight == (microbatches if schedule is Schedule.GPIPE else stages)


def test_each_stage_holds_its_share_of_the_layers() -> None:
    flat = _plan("dp=x", "x=8", "8")
    piped = _plan("dp=x,pp=z", "x=2,z=4", "2x4", microbatches=4)
    (name, block), (_, piped_block) = flat.parts[0], piped.parts[0]  # type: ignore[attr-defined]
    assert name == "block"
    assert (block.layers, piped_block.layers) == (4, 1)  # 4 layers over 4 stages
    # parameters per chip: one layer of four
    assert piped_block.memory.params == pytest.approx(block.memory.params / 4)


def test_data_parallel_gradients_are_reduced_once_per_step_not_per_microbatch() -> None:
    one = _plan("dp=x+y+z", "x=2,y=2,z=2", "2x2x2", microbatches=1)
    four = _plan("dp=x+y+z", "x=2,y=2,z=2", "2x2x2", microbatches=4)
    # the same tokens in 4 microbatches: compute the same, the all-reduces once either way
    assert four.compute_s == pytest.approx(one.compute_s, rel=1e-9)  # type: ignore[attr-defined]
    assert four.grad_reduction_s > 0  # type: ignore[attr-defined]
    grads_in_four = four.comm_s - four.grad_reduction_s  # type: ignore[attr-defined]
    assert grads_in_four < one.comm_s  # type: ignore[attr-defined]


def test_remat_trades_activation_memory_for_compute() -> None:
    none = _plan("fsdp=x+y+z", "x=2,y=2,z=2", "2x2x2")
    full = _plan("fsdp=x+y+z", "x=2,y=2,z=2", "2x2x2", remat=Remat.FULL)
    assert full.memory.activations < none.memory.activations  # type: ignore[attr-defined]
    assert full.compute_s > none.compute_s  # type: ignore[attr-defined]
    assert full.model_flops == none.model_flops  # type: ignore[attr-defined]


def test_a_strategy_whose_batch_does_not_split_is_rejected_with_the_reason() -> None:
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=2,y=2,z=2", "2x2x2")
    plan = plan_model(tiny(), mesh, "dp=x+y+z", Training(batch_tokens=512, seq_len=128))
    assert isinstance(plan, Rejected)
    assert "does not divide over x+y+z" in plan.reason


# -- the search -------------------------------------------------------------------------


def test_the_search_ranks_layouts_that_fit_best_first_and_beats_a_named_strategy() -> None:
    topology = Topology.build(load_preset("tpu-v5p"), "2x2x2")
    result = search_model(tiny(), topology, batch_tokens=8192, seq_len=128, top=5)
    steps = [plan.step_lower_s for plan in result.plans]
    assert steps == sorted(steps)
    assert all(plan.fits for plan in result.plans)
    assert result.considered >= result.screened >= result.recosted >= len(result.plans)
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=2,y=2,z=2", "2x2x2")
    named = plan_model(tiny(), mesh, "fsdp=x+y+z", Training(batch_tokens=8192, seq_len=128))
    assert steps[0] <= named.step_lower_s * (1 + 1e-9)  # type: ignore[union-attr]
    assert result.best_reason


def test_a_searched_plan_passes_back_as_a_strategy() -> None:
    """The name the search prints, on the mesh it prints, costs the same when planned."""
    topology = Topology.build(load_preset("h100"), "2x8")
    result = search_model(tiny(), topology, batch_tokens=8192, seq_len=128, top=1)
    best = result.plans[0]
    mesh = DeviceMesh.create(load_preset("h100"), best.mesh.spec_text, "2x8")
    again = plan_model(tiny(), mesh, best.name, best.training)
    assert again.step_lower_s == pytest.approx(best.step_lower_s, rel=1e-9)  # type: ignore[union-attr]


# -- the model command ------------------------------------------------------------------


def _model_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, object]:
    assert main(["model", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


def test_model_json_has_the_contract_fields(capsys: pytest.CaptureFixture[str]) -> None:
    """shared/cli_contract.md's `model` entry, every name relied on."""
    data = _model_json(
        capsys, "--config", str(MODELS / "llama3-8b.toml"), "--hardware", "tpu-v5p",
        "--topology", "4x4x4", "--batch-tokens", "262144", "--seq-len", "4096",
        "--strategy", "fsdp=x+y,sp=z", "--train-tokens", "1e12",
    )  # fmt: skip
    assert {"params", "flops_per_token"} <= set(data["model"])  # type: ignore[arg-type]
    (strategy,) = data["strategies"]  # type: ignore[misc]
    assert strategy["name"] == "fsdp=x+y,sp=z"
    assert {"lower_bound", "upper_bound"} <= set(strategy["step_time_s"])
    assert {"params", "grads", "optimizer", "activations", "transient", "peak"} == set(
        strategy["memory_per_chip_bytes"]
    )
    for key in ("mfu", "tokens_per_s_per_chip", "fits", "bottleneck"):
        assert key in strategy
    assert "critical_batch_tokens_per_chip" in strategy
    days = 1e12 / 262144 * strategy["step_time_s"]["lower_bound"] / 86400
    assert data["training_days"] == pytest.approx(days)
    assert data["mesh"] == {"x": 4, "y": 4, "z": 4}  # the topology's dimensions as axes


def test_model_over_dcn_takes_slices_as_an_axis(capsys: pytest.CaptureFixture[str]) -> None:
    data = _model_json(
        capsys, "--config", str(MODELS / "llama3-8b.toml"), "--hardware", "tpu-v5p",
        "--topology", "4x4x4", "--num-slices", "2", "--batch-tokens", "524288",
        "--seq-len", "4096", "--strategy", "dp=slice,fsdp=x+y,sp=z",
    )  # fmt: skip
    assert data["mesh"] == {"slice": 2, "x": 4, "y": 4, "z": 4}
    assert data["num_devices"] == 128


def test_model_errors_are_json_under_json(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["model", "--config", str(MODELS / "llama3-8b.toml"), "--hardware", "tpu-v5p",
         "--topology", "4x4x4", "--batch-tokens", "1000", "--search", "--json"]
    )  # fmt: skip
    assert code == 1
    error = json.loads(capsys.readouterr().out)
    assert set(error) == {"error", "fix"}
    assert "1000" in error["error"]


def test_model_strategy_steps_match_the_python_api(capsys: pytest.CaptureFixture[str]) -> None:
    data = _model_json(
        capsys, "--config", str(MODELS / "llama3-8b.toml"), "--hardware", "h100",
        "--topology", "4x8", "--batch-tokens", "131072", "--seq-len", "4096",
        "--strategy", "dp=node,sp=gpu", "--microbatches", "4",
    )  # fmt: skip
    mesh = DeviceMesh.create(load_preset("h100"), "node=4,gpu=8", "4x8")
    plan = plan_model(
        load_model_config(MODELS / "llama3-8b.toml"), mesh, "dp=node,sp=gpu,mb=4",
        Training(batch_tokens=131072, seq_len=4096, microbatches=4),
    )  # fmt: skip
    (strategy,) = data["strategies"]  # type: ignore[misc]
    assert strategy["step_time_s"]["lower_bound"] == pytest.approx(plan.step_lower_s)  # type: ignore[union-attr]
    assert math.isclose(strategy["mfu"], plan.mfu)  # type: ignore[union-attr]


def test_the_screen_counts_the_head_once_on_the_last_pipeline_stage() -> None:
    """The screen's closed form against every layout's exact cost, on a model whose head
    (a 262,144-word vocabulary) is a large share of the step: the head's matmul runs on the
    last stage, whose pace sets a pipeline's, so spreading it over the stages made the
    screen favour pipelines (here its median error was -25% on them, +31% on the rest, with
    the embedding's gather counted as a matmul); it must err alike on both."""
    config = tiny(d=1024, f=4096, n=16, k=8, h=64, layers=8, vocab=262144, seq_len=1024)
    topology = Topology.build(load_preset("tpu-v5p"), "2x2x2")
    pipelined: list[bool] = []
    plan_model_ = model_search.plan_model

    def recording(config: ModelConfig, mesh: DeviceMesh, *args: object, **kw: object) -> object:
        pipelined.append("pp" in mesh.axis_names)
        return plan_model_(config, mesh, *args, **kw)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_search, "plan_model", recording)
        result = search_model(
            config, topology, batch_tokens=2**16, seq_len=1024, microbatch_options=(8,),
            remats=(Remat.NONE,), recost=10**6,
        )  # fmt: skip
    assert len(pipelined) == len(result.screen_error)  # every layout re-costed, none refused
    errors: dict[bool, tuple[float, ...]] = {True: (), False: ()}
    for is_pp, error in zip(pipelined, result.screen_error, strict=True):
        errors[is_pp] += (error,)
    assert errors[True]
    assert errors[False]
    gap = statistics.median(errors[True]) - statistics.median(errors[False])
    assert abs(gap) < 0.1, gap
