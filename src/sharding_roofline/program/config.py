"""Model configs: a Hugging Face style ``config.json`` or our own TOML -> ``ModelConfig``.

The field names are the ones users already have (``hidden_size``, ``intermediate_size``,
``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``num_hidden_layers``,
``vocab_size``, ``tie_word_embeddings``; for mixtures of experts ``num_local_experts`` or
``n_routed_experts``, ``num_experts_per_tok``, ``n_shared_experts``,
``moe_intermediate_size``, ``first_k_dense_replace``). A field that does not change the
cost (``rope_theta``, ``bos_token_id``, ...) is accepted and listed as ignored; any other
field is an error naming it, and so are contradictions (more KV heads than heads, two
expert counts that disagree).

Our TOML takes the same names plus ``name``, ``source`` (where the numbers come from),
``seq_len``, ``attention`` (``flash`` or ``materialized``) and ``dtype``.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..dtypes import canonical_dtype
from ..errors import ConfigError

#: Hugging Face fields that do not change a roofline (positions, tokens, init, dropout).
IGNORED = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "use_cache",
        "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "rms_norm_eps",
        "layer_norm_eps", "norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
        "max_position_embeddings", "attention_bias", "attention_dropout", "mlp_bias",
        "pretraining_tp", "hidden_act", "hidden_dropout", "sliding_window",
        "use_sliding_window", "max_window_layers", "router_aux_loss_coef",
        "output_router_logits", "router_jitter_noise", "aux_loss_alpha", "seq_aux",
        "scoring_func", "topk_method", "n_group", "topk_group", "norm_topk_prob",
        "routed_scaling_factor", "ep_size", "moe_layer_freq", "num_nextn_predict_layers",
        "quantization_config", "auto_map", "tie_word_embedding", "_name_or_path",
        "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
        "rope_interleave", "qkv_bias", "use_qk_norm", "bias", "dtype",
    }
)  # fmt: skip

_FIELDS = {
    "hidden_size": "d",
    "intermediate_size": "f",
    "num_attention_heads": "n",
    "num_key_value_heads": "k",
    "head_dim": "h",
    "num_hidden_layers": "layers",
    "vocab_size": "vocab",
    "tie_word_embeddings": "tie_embeddings",
    "num_local_experts": "experts",
    "n_routed_experts": "experts",
    "num_experts": "experts",
    "num_experts_per_tok": "top_k",
    "n_shared_experts": "shared_experts",
    "moe_intermediate_size": "expert_f",
    "first_k_dense_replace": "dense_layers",
}
_OURS = {"name", "source", "seq_len", "attention", "capacity_factor", "notes"}


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer: L identical blocks (the first ``dense_layers`` dense, the
    rest mixture-of-experts when ``experts`` > 0), embedding, final norm, unembedding."""

    name: str
    d: int
    f: int
    n: int
    k: int
    h: int
    layers: int
    vocab: int
    tie_embeddings: bool = False
    experts: int = 0
    top_k: int = 0
    shared_experts: int = 0
    expert_f: int = 0
    dense_layers: int = 0
    capacity_factor: float = 1.0
    seq_len: int = 0
    attention: str = "flash"
    dtype: str = "bfloat16"
    source: str = ""
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        where = f"model {self.name!r}"
        for field_name in ("d", "f", "n", "k", "h", "layers", "vocab"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: {field_name}={value!r} must be a positive integer")
        if self.k > self.n or self.n % self.k:
            raise ConfigError(
                f"{where}: num_key_value_heads={self.k} must divide num_attention_heads="
                f"{self.n} (grouped-query attention)"
            )
        if self.experts:
            if not 0 < self.top_k <= self.experts:
                raise ConfigError(
                    f"{where}: num_experts_per_tok={self.top_k} must be between 1 and the "
                    f"{self.experts} experts"
                )
            if self.expert_f < 1:
                object.__setattr__(self, "expert_f", self.f)
            if not 0 <= self.dense_layers <= self.layers:
                raise ConfigError(
                    f"{where}: first_k_dense_replace={self.dense_layers} must be between 0 and "
                    f"num_hidden_layers={self.layers}"
                )
        elif self.top_k or self.shared_experts:
            raise ConfigError(
                f"{where}: num_experts_per_tok / n_shared_experts given without experts; add "
                "num_local_experts (or n_routed_experts)"
            )
        if self.capacity_factor < 1:
            raise ConfigError(f"{where}: capacity_factor={self.capacity_factor} must be >= 1")
        if self.attention not in ("flash", "materialized"):
            raise ConfigError(
                f"{where}: attention={self.attention!r}; expected flash or materialized"
            )
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    @property
    def moe_layers(self) -> int:
        return self.layers - self.dense_layers if self.is_moe else 0

    def params(self) -> dict[str, int]:
        """Parameter counts by part (exact from the shapes; norms included)."""
        d, h = self.d, self.h
        attention = d * self.n * h * 2 + d * self.k * h * 2
        dense_mlp = 3 * d * self.f
        moe_mlp = (
            3 * d * self.expert_f * (self.experts + self.shared_experts) + d * self.experts
            if self.is_moe
            else 0
        )
        norms = 2 * d
        blocks = (self.layers - self.moe_layers) * (
            attention + dense_mlp + norms
        ) + self.moe_layers * (attention + moe_mlp + norms)
        embedding = self.vocab * d
        head = 0 if self.tie_embeddings else self.vocab * d
        return {
            "blocks": blocks,
            "embedding": embedding,
            "unembedding": head,
            "final_norm": d,
            "total": blocks + embedding + head + d,
            "active": (
                blocks
                - self.moe_layers * 3 * d * self.expert_f * (self.experts - self.top_k)
                + embedding
                + head
                + d
            ),
        }


def from_hf(
    data: Mapping[str, Any], *, name: str = "", filename: str = "config.json"
) -> ModelConfig:
    """A ``ModelConfig`` from a Hugging Face ``config.json``'s fields (or our TOML's)."""
    values: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in data.items():
        if key in _FIELDS:
            ours = _FIELDS[key]
            if ours in values and values[ours] != value:
                raise ConfigError(
                    f"{filename}: {key} = {value!r} contradicts another field for the same "
                    f"quantity ({ours} = {values[ours]!r}); give one of them"
                )
            values[ours] = value
        elif key in _OURS:
            values[key] = value
        elif key in IGNORED:
            ignored.append(key)
        else:
            raise ConfigError(
                f"{filename}: unknown field {key!r}; expected the config.json fields "
                f"{', '.join(sorted(_FIELDS))} (fields that do not change the cost, like "
                "rope_theta, are ignored; ours: name, source, seq_len, attention, "
                "capacity_factor)"
            )
    missing = [
        k for k, v in _FIELDS.items() if v in ("d", "f", "n", "layers", "vocab") and v not in values
    ]
    if missing:
        raise ConfigError(
            f"{filename}: missing field {missing[0]!r} (required: hidden_size, "
            "intermediate_size, num_attention_heads, num_hidden_layers, vocab_size)"
        )
    values.setdefault("k", values["n"])
    if "h" not in values:
        if values["d"] % values["n"]:
            raise ConfigError(
                f"{filename}: hidden_size {values['d']} is not a multiple of "
                f"num_attention_heads {values['n']}; give head_dim"
            )
        values["h"] = values["d"] // values["n"]
    notes = values.pop("notes", "")
    del notes
    try:
        return ModelConfig(
            name=str(values.pop("name", name or Path(filename).stem)),
            ignored=tuple(sorted(ignored)),
            **values,
        )
    except TypeError as exc:  # a wrong type (a string for a size): name the field
        raise ConfigError(f"{filename}: {exc}") from None


def load_model_config(path: str | Path) -> ModelConfig:
    """Read ``configs/models/NAME.toml`` or a Hugging Face ``config.json``."""
    file = Path(path)
    if not file.is_file():
        shipped = Path(__file__).resolve().parents[3] / "configs" / "models" / f"{path}.toml"
        if shipped.is_file():
            file = shipped
        else:
            raise ConfigError(
                f"model config {str(path)!r} is not a file; give a .toml or config.json path, "
                "e.g. configs/models/llama3-70b.toml"
            )
    if file.stat().st_size > 1 << 20:
        raise ConfigError(f"{file.name}: larger than 1 MiB; a model config is a few hundred bytes")
    text = file.read_text(encoding="utf-8", errors="strict")
    try:
        data = json.loads(text) if file.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{file.name}: not valid {file.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{file.name}: expected an object of fields")
    return from_hf(data, name=file.stem, filename=file.name)
