"""Model configuration: one frozen, validated dataclass and the paper's seven TinyStories presets.

The presets are the GPT-Neo family of Eldan & Li (2023) that Boughorbel et al. (2024) retrain on
translated Arabic TinyStories: 16 heads, MLP 4*d_model, a 256-token local window on alternating
layers, 2048 learned positions, tied embeddings and gelu_new. Only the vocabulary changes (the
paper's 32k BPE instead of GPT-Neo's 50257), so it is a field, not part of the preset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Literal

from jaxlm.errors import UserError

AttentionKind = Literal["global", "local"]
DType = Literal["float32", "bfloat16", "float16"]
AttentionImpl = Literal["xla", "cudnn", "auto"]


def _alternating(n: int) -> tuple[str, ...]:
    return tuple("global" if i % 2 == 0 else "local" for i in range(n))


# ModelConfig fields that change how the model computes, not what it is: a resumed or continued
# run may change them, and the benchmark pairs them with the torch peers' plain model.
COMPUTE_FIELDS = ("dtype", "attention_impl", "remat", "residual_float32")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A GPT-Neo causal LM. Field names follow jaxlm's dimension alphabet (see model.py)."""

    vocab_size: int = 32000  # V: from the tokenizer; 32000 is the paper's BPE size
    d_model: int = 64  # D
    n_layers: int = 8  # number of transformer blocks
    n_heads: int = 16  # N; head dim H = D / N
    d_mlp: int | None = None  # F; None means 4 * D
    max_positions: int = 2048  # learned absolute positions
    window_size: int = 256  # a local layer sees itself and the previous window_size - 1 tokens
    attention_layers: tuple[str, ...] = ()  # per layer "global" | "local"; () means alternating
    layer_norm_eps: float = 1e-5
    activation: Literal["gelu_new"] = "gelu_new"
    tie_embeddings: bool = True  # GPT-Neo ties lm_head to wte; kept True for HF parity
    init_std: float = 0.02  # GPT-Neo's initializer_range
    dtype: DType = "float32"  # compute dtype; parameters always stay float32 (master weights)
    attention_impl: AttentionImpl = "xla"  # xla: exact einsum path; cudnn: fused flash attention
    remat: bool = False  # recompute each block in the backward pass (saves activation memory)
    residual_float32: bool = False  # in a 16-bit dtype, keep the residual stream float32

    def __post_init__(self) -> None:
        if not self.attention_layers:
            object.__setattr__(self, "attention_layers", _alternating(self.n_layers))
        else:
            object.__setattr__(self, "attention_layers", tuple(self.attention_layers))
        self.validate()

    @property
    def d_ff(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise UserError(f"model config: {msg}")

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_positions"):
            need(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be >= 1")
        need(
            self.d_model % self.n_heads == 0,
            f"n_heads={self.n_heads} does not divide d_model={self.d_model}; "
            f"pick n_heads from {[h for h in range(1, 65) if self.d_model % h == 0][-6:]}",
        )
        need(self.window_size >= 1, f"window_size={self.window_size} must be >= 1 (GPT-Neo: 256)")
        need(self.d_mlp is None or self.d_mlp >= 1, f"d_mlp={self.d_mlp} must be >= 1 or null")
        need(
            len(self.attention_layers) == self.n_layers,
            f"attention_layers has {len(self.attention_layers)} entries "
            f"but n_layers={self.n_layers}",
        )
        bad = [a for a in self.attention_layers if a not in ("global", "local")]
        need(not bad, f"attention_layers entries must be 'global' or 'local', got {bad[:3]}")
        need(self.layer_norm_eps > 0, f"layer_norm_eps={self.layer_norm_eps} must be > 0")
        need(self.dtype in ("float32", "bfloat16", "float16"), f"dtype={self.dtype!r} unknown")
        need(
            self.attention_impl in ("xla", "cudnn", "auto"),
            f"attention_impl={self.attention_impl!r}",
        )
        need(self.activation == "gelu_new", f"activation={self.activation!r}: only gelu_new")
        need(self.tie_embeddings, "tie_embeddings=False is not supported (GPT-Neo ties them)")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_layers"] = list(self.attention_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "model config") -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"{where}: unknown key {unknown[0]!r}; known keys: {sorted(known)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ModelConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{path}: cannot read model config ({e})") from None
        return cls.from_dict(d, where=str(path))

    def num_params(self) -> int:
        """Parameter count, as transformers counts it (tied lm_head counted once)."""
        D, F, V, L = self.d_model, self.d_ff, self.vocab_size, self.n_layers
        per_layer = 4 * D + 3 * D * D + D * D + D + D * F + F + F * D + D
        return V * D + self.max_positions * D + L * per_layer + 2 * D


# name -> (d_model, n_layers, attention_layers or None for alternating)
_PRESETS: dict[str, tuple[int, int, tuple[str, ...] | None]] = {
    "ts-1m": (64, 8, None),
    "ts-3m": (128, 8, None),
    "ts-8m": (256, 8, None),
    "ts-28m": (512, 8, None),
    "ts-33m": (768, 4, None),
    "ts-1l-21m": (1024, 1, ("global",)),
    "ts-2l-33m": (1024, 2, ("global", "local")),
}
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named TinyStories architecture; `overrides` set other fields (vocab_size, dtype...)."""
    if name not in _PRESETS:
        raise UserError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    d_model, n_layers, layers = _PRESETS[name]
    return ModelConfig(
        d_model=d_model, n_layers=n_layers, attention_layers=layers or (), **overrides
    )
