"""Measured training runs (the Ultra-Scale Playbook's and torchtitan's) mapped onto the
model planner: a ``ModelConfig``, a mesh, a strategy and a ``Training`` per run.

Only the mapping lives here (the CSVs stay in the shared data folder; the rows are read
by ``data.read_rows``). What each run's configuration becomes, and what cannot be mapped,
is in docs/calibration.md ("Mapping the runs").

**Playbook (nanotron).** Ranks are laid out pp-major, then dp, then tp (nanotron's
``ParallelContext`` reshapes the world as ``(pp, dp, tp)``), so the mesh is
``pp=P,dp=D,tp=T`` on ``NODESx8`` with tensor parallelism innermost (inside a node up to 8).
The strategy is ``dp=dp,sp=tp,pp=pp,zero=Z,regather=1`` (nanotron's ``tp_mode:
REDUCE_SCATTER`` is sequence parallelism, and its default ``tp_recompute_allgather`` saves
the gathered inputs as shards and gathers them again in the backward), 1F1B, no
recomputation, AdamW with fp32 master weights and moments; ``grad_accum_steps`` microbatches
of ``micro_batch_size`` sequences of 4096 tokens. Runs with fewer microbatches than stages
(which the planner refuses) are planned with ``m = P`` and costed with the real ``m``
(``step.step_features``); runs with more stages than layers (3B on 32 stages: nanotron
counts the embedding and head as pipeline blocks) cannot be mapped.

**torchtitan.** World mesh ``pp, dp_shard, cp, tp`` (torchtitan's order), strategy
``fsdp=fsdp+cp,cp=cp,sp=tp,pp=pp`` (FSDP shards over the data and context axes; TP with
sequence-parallel norms); activation checkpointing ``full`` -> remat full, ``selective``
and ``per-op selective`` -> remat dots (torchtitan's op-level policy saves matmul
outputs); a missing sequence length is torchtitan's Llama 3 default, 8192; pipelined runs
use microbatches of one sequence (torchtitan's default), 1F1B or interleaved with 2
chunks. float8, torch.compile and async TP are not modelled (bf16 GEMMs, no fusion, TP
collectives as measured unfused); the GPUs are 96 GB HBM2e H100s at 500 W, costed as the
``h100`` preset.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from ..hardware import HardwareSpec
from ..mesh import DeviceMesh
from ..plans import Rejected
from ..program.autodiff import Remat
from ..program.config import ModelConfig, load_model_config
from ..program.model import ModelPlan, Schedule, Training, plan_model
from .data import Row

GPUS_PER_NODE = 8
#: The Playbook's sequence length ("all benchmarks ... a sequence length of 4,096").
PLAYBOOK_SEQ_LEN = 4096
#: torchtitan's Llama 3 training configs' ``seq_len`` where a table does not state one.
TORCHTITAN_DEFAULT_SEQ_LEN = 8192
#: torchtitan's model names -> the project's shipped model configs.
TORCHTITAN_MODELS = {
    "Llama 3.1 8B": "llama3-8b",
    "Llama 3.1 70B": "llama3-70b",
    "Llama 3.1 405B": "llama3-405b",
}


def _int(row: Row | Mapping[str, str], column: str, where: str) -> int:
    try:
        return int(row[column])
    except (KeyError, ValueError):
        raise ConfigError(f"{where}: column {column!r} is not an integer") from None


def playbook_model_configs(rows: list[Row]) -> dict[str, ModelConfig]:
    """``playbook_models.csv`` -> a ``ModelConfig`` per model label (1B, 3B, 8B, 80B)."""
    out = {}
    for row in rows:
        where = f"playbook_models.csv row {row.index}"
        label = row["model"]
        out[label] = ModelConfig(
            name=f"playbook-{label}",
            d=_int(row, "hidden_size", where),
            f=_int(row, "ffn_intermediate_size", where),
            n=_int(row, "num_attention_heads", where),
            k=_int(row, "num_kv_heads", where),
            h=_int(row, "head_dim", where),
            layers=_int(row, "num_layers", where),
            vocab=_int(row, "vocab_size", where),
            tie_embeddings=row["tie_word_embeddings"].strip().lower() == "true",
            seq_len=PLAYBOOK_SEQ_LEN,
            source=f"playbook_models.csv ({row['nanotron_config_label']} in nanotron's generator)",
        )
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class RunLayout:
    """A run's configuration as the planner takes it."""

    model: str
    mesh_spec: str
    topology: str
    strategy: str
    training: Training
    #: the run's microbatches when the plan uses more (``step.step_features``); else None
    microbatches: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class PlaybookRun:
    """One row of ``playbook_h100_runs.csv`` or ``playbook_h100_failed_runs.csv``."""

    index: int
    run_id: str
    model: str
    nodes: int
    dp: int
    tp: int
    pp: int
    zero: int
    micro_batch_size: int
    grad_accum_steps: int
    seq_len: int
    #: measured (None in the failed-runs file)
    tokens_per_s_per_gpu: float | None
    memory_bytes: float | None
    status: str
    #: source entries of this configuration that carry measurements
    n_measured_same_config: int = 0

    @classmethod
    def from_row(cls, row: Row, name: str) -> PlaybookRun:
        where = f"{name} row {row.index}"
        measured = row.cells.get("tokens_per_s_per_gpu", "")
        memory = row.cells.get("gpu_memory_GB", "")
        return cls(
            index=row.index,
            run_id=row["run_id"],
            model=row["model"],
            nodes=_int(row, "nodes", where),
            dp=_int(row, "dp", where),
            tp=_int(row, "tp", where),
            pp=_int(row, "pp", where),
            zero=_int(row, "zero_stage", where),
            micro_batch_size=_int(row, "micro_batch_size", where),
            grad_accum_steps=_int(row, "grad_accum_steps", where),
            seq_len=_int(row, "seq_len", where),
            tokens_per_s_per_gpu=float(measured) if measured else None,
            # "GPU memory" in GB as labelled: read as 1e9 bytes (the source does not say)
            memory_bytes=float(memory) * 1e9 if memory else None,
            status=row["status"],
            n_measured_same_config=_int(row, "n_measured_same_config", where),
        )

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp

    @property
    def batch_tokens(self) -> int:
        return self.dp * self.micro_batch_size * self.grad_accum_steps * self.seq_len

    @property
    def measured_step_s(self) -> float | None:
        """The step time the measured tokens/s per GPU implies."""
        if not self.tokens_per_s_per_gpu:
            return None
        return self.batch_tokens / (self.tokens_per_s_per_gpu * self.gpus)

    def layout(self) -> RunLayout:
        if self.gpus != self.nodes * GPUS_PER_NODE:
            raise ConfigError(
                f"Playbook run {self.run_id}: dp·tp·pp = {self.gpus} is not {self.nodes} nodes "
                f"of {GPUS_PER_NODE}"
            )
        pipelined = self.pp > 1
        planned = max(self.grad_accum_steps, self.pp) if pipelined else self.grad_accum_steps
        override = self.grad_accum_steps if planned != self.grad_accum_steps else None
        sequences = self.dp * self.micro_batch_size * planned
        return RunLayout(
            model=self.model,
            mesh_spec=f"pp={self.pp},dp={self.dp},tp={self.tp}",
            topology=f"{self.nodes}x{GPUS_PER_NODE}",
            # nanotron's tp_recompute_allgather (its default): SP's gathered inputs are
            # saved as shards and gathered again in the backward
            strategy=f"dp=dp,sp=tp,pp=pp,zero={self.zero},regather=1",
            training=Training(
                batch_tokens=sequences * self.seq_len,
                seq_len=self.seq_len,
                microbatches=planned,
                schedule=Schedule.ONE_F_ONE_B,
                remat=Remat.NONE,
            ),
            microbatches=override,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TorchtitanRun:
    """One row of ``torchtitan_h100.csv``."""

    index: int
    label: str
    model: str
    gpus: int
    fsdp: int
    tp: int
    pp: int
    cp: int
    local_batch_size: int
    global_batch_size: int | None
    seq_len: int
    seq_len_stated: bool
    activation_checkpointing: str
    float8: str
    torch_compile: str
    async_tp: str
    pp_schedule: str
    tokens_per_s_per_gpu: float
    memory_bytes: float | None  # the table's GiB, in bytes

    @classmethod
    def from_row(cls, row: Row) -> TorchtitanRun:
        where = f"torchtitan_h100.csv row {row.index}"
        stated = bool(row["seq_len"].strip())
        memory = row["memory_GiB"].strip()
        return cls(
            index=row.index,
            label=f"{row['table']}: {row['row_label']}",
            model=row["model"],
            gpus=_int(row, "num_gpus", where),
            fsdp=_int(row, "fsdp", where),
            tp=_int(row, "tp", where),
            pp=_int(row, "pp", where),
            cp=_int(row, "cp", where),
            local_batch_size=_int(row, "local_batch_size", where),
            global_batch_size=(
                _int(row, "global_batch_size", where) if row["global_batch_size"].strip() else None
            ),
            seq_len=_int(row, "seq_len", where) if stated else TORCHTITAN_DEFAULT_SEQ_LEN,
            seq_len_stated=stated,
            activation_checkpointing=row["activation_checkpointing"].strip(),
            float8=row["float8"].strip(),
            torch_compile=row["torch_compile"].strip(),
            async_tp=row["async_tp"].strip(),
            pp_schedule=row["pp_schedule"].strip(),
            tokens_per_s_per_gpu=float(row["tps_per_gpu"]),
            memory_bytes=float(memory) * 2**30 if memory else None,
        )

    @property
    def not_modelled(self) -> tuple[str, ...]:
        """What of this run the planner does not model."""
        out = []
        if self.float8 not in ("", "no"):
            out.append(f"float8 ({self.float8})")
        if self.torch_compile == "yes":
            out.append("torch.compile")
        if self.async_tp == "yes":
            out.append("async TP")
        if not self.seq_len_stated:
            out.append(f"seq_len not stated (assumed {TORCHTITAN_DEFAULT_SEQ_LEN})")
        return tuple(out)

    def layout(self) -> RunLayout:
        if self.fsdp * self.tp * self.pp * self.cp != self.gpus:
            raise ConfigError(
                f"torchtitan row {self.index}: fsdp·tp·pp·cp is not its {self.gpus} GPUs"
            )
        if self.model not in TORCHTITAN_MODELS:
            raise ConfigError(f"torchtitan row {self.index}: unknown model {self.model!r}")
        sequences = self.global_batch_size or self.local_batch_size * self.fsdp
        pipelined = self.pp > 1
        microbatches = self.local_batch_size if pipelined else 1
        interleaved = "interleaved" in self.pp_schedule.lower()
        remat = Remat.FULL if self.activation_checkpointing == "full" else Remat.DOTS
        return RunLayout(
            model=TORCHTITAN_MODELS[self.model],
            mesh_spec=f"pp={self.pp},fsdp={self.fsdp},cp={self.cp},tp={self.tp}",
            topology=f"{self.gpus // GPUS_PER_NODE}x{GPUS_PER_NODE}",
            strategy="fsdp=fsdp+cp,cp=cp,sp=tp,pp=pp",
            training=Training(
                batch_tokens=sequences * self.seq_len,
                seq_len=self.seq_len,
                microbatches=microbatches,
                schedule=Schedule.INTERLEAVED if interleaved else Schedule.ONE_F_ONE_B,
                virtual_stages=2 if interleaved else 1,
                remat=remat,
            ),
        )


class RunPlanner:
    """Plans runs on one hardware preset with shared caches (meshes, evaluations)."""

    def __init__(self, hardware: HardwareSpec, configs: Mapping[str, ModelConfig]) -> None:
        self.hardware = hardware
        self.configs = dict(configs)
        self.meshes: dict[tuple[str, str], DeviceMesh] = {}
        self.cache: dict[object, object] = {}
        self.plans: dict[tuple[object, ...], ModelPlan | Rejected] = {}

    def config(self, name: str) -> ModelConfig:
        if name not in self.configs:
            self.configs[name] = load_model_config(name)  # a shipped config's name
        return self.configs[name]

    def mesh(self, spec: str, topology: str) -> DeviceMesh:
        key = (spec, topology)
        if key not in self.meshes:
            self.meshes[key] = DeviceMesh.create(self.hardware, spec, topology)
        return self.meshes[key]

    def plan(self, layout: RunLayout) -> ModelPlan | Rejected:
        t = layout.training
        key = (layout.model, layout.mesh_spec, layout.topology, layout.strategy, t)
        if key not in self.plans:
            self.plans[key] = plan_model(
                self.config(layout.model),
                self.mesh(layout.mesh_spec, layout.topology),
                layout.strategy,
                t,
                cache=self.cache,
            )
        return self.plans[key]


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 2 values
    or a constant side."""
    if len(a) != len(b):
        raise ConfigError("spearman needs two sequences of one length")
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    if va == 0 or vb == 0:
        return math.nan
    return cov / math.sqrt(va * vb)


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
