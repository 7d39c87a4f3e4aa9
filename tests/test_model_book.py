"""The scaling book's model-level training answers, from the tool's model plans."""

from __future__ import annotations

import dataclasses

import pytest

from sharding_roofline import DeviceMesh, load_preset
from sharding_roofline.program.config import ModelConfig, load_model_config
from sharding_roofline.program.model import ModelPlan, Training, plan_model

V5P_C = 4.59e14


def plan(cfg: ModelConfig, mesh: DeviceMesh, strategy: str, train: Training) -> ModelPlan:
    result = plan_model(cfg, mesh, strategy, train)
    assert isinstance(result, ModelPlan), result
    return result


# -- model FLOPs do not depend on the attention kernel ----------------------------------------


def test_model_flops_count_no_recomputation() -> None:
    """MFU counts the model's FLOPs, not remat's: a flash kernel recomputes the scores in the
    backward pass (more compute time), a materialized one does not; both train the same
    model, with 12·T·N·H attention FLOPs per token and layer (PaLM's MFU convention)."""
    llama3 = load_model_config("llama3-70b")
    mesh = DeviceMesh.create(load_preset("tpu-v5p"), "x=8,y=16,z=16", "8x16x16")
    train = Training(batch_tokens=2**21, seq_len=1024)
    flash = plan(llama3, mesh, "fsdp=x+y+z", train)
    plain = plan(dataclasses.replace(llama3, attention="materialized"), mesh, "fsdp=x+y+z", train)
    assert flash.model_flops == plain.model_flops
    recompute = 2 * 1024 * llama3.n * llama3.h * llama3.layers * train.batch_tokens
    assert flash.compute_s - plain.compute_s == pytest.approx(recompute / (2048 * V5P_C))
