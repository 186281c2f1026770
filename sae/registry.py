"""SAE architectures by name: `register("topk")` on a class, `create(cfg, seed)` to build one."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from flax import nnx

from jaxlm.errors import UserError

if TYPE_CHECKING:
    from sae.base import SAE, SAEConfig

_REGISTRY: dict[str, type[SAE]] = {}


def register(name: str) -> Callable[[type[SAE]], type[SAE]]:
    def deco(cls: type[SAE]) -> type[SAE]:
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    _load_variants()
    return sorted(_REGISTRY)


def get(name: str) -> type[SAE]:
    """The SAE class registered as `name`."""
    _load_variants()
    if name not in _REGISTRY:
        raise UserError(f"sae.architecture={name!r}: known ones are {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def create(cfg: SAEConfig, seed: int = 0) -> SAE:
    """A freshly initialised SAE of `cfg.architecture` (SAELens's initialisation)."""
    return get(cfg.architecture)(cfg, rngs=nnx.Rngs(seed))


def _load_variants() -> None:
    import sae.variants  # noqa: F401  (registers the built-in architectures)
