"""SAE architectures by name: the built-in four, `register(cls)` for new ones, `create(cfg)`.

A variant is a `sae.base.SAE` subclass that names itself with a class attribute
(`architecture = "topk"`); `register` files it under that name, and everything that builds or
loads an SAE (training, `sae.io.load_sae`, hence TSEA and the dashboards) looks the name up here.
A variant is written once, as a class; to add one:

    from sae.registry import register
    from sae.variants import StandardSAE

    @register
    class SquaredReLUSAE(StandardSAE):
        architecture = "squared_relu"
        def encode_with_hidden_pre(self, x_nf): ...

The variants never import this module (it imports them), so there is no import cycle.
"""

from __future__ import annotations

from typing import TypeVar

from flax import nnx

from jaxlm.errors import UserError
from sae.base import SAE, SAEConfig
from sae.variants import BatchTopKSAE, JumpReLUSAE, StandardSAE, TopKSAE

C = TypeVar("C", bound=type[SAE])

_REGISTRY: dict[str, type[SAE]] = {}


def register(cls: C) -> C:
    """File `cls` under its `architecture` (usable as a class decorator); returns `cls`.

    A name already taken is an error rather than a silent overwrite: two variants answering to
    one name would make saved SAEs load as whichever was registered last.
    """
    name = cls.__dict__.get("architecture")
    if not isinstance(name, str) or not name:
        raise UserError(
            f"{cls.__qualname__} names no architecture: give it a class attribute "
            '`architecture = "NAME"`'
        )
    if name in _REGISTRY:
        taken = _REGISTRY[name]
        raise UserError(
            f"SAE architecture {name!r} is taken (by {taken.__module__}.{taken.__qualname__}); "
            "give the new variant another name"
        )
    _REGISTRY[name] = cls
    return cls


def names() -> list[str]:
    """Every registered architecture name, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[SAE]:
    """The SAE class registered as `name`."""
    if name not in _REGISTRY:
        raise UserError(f"sae.architecture={name!r}: known ones are {', '.join(names())}")
    return _REGISTRY[name]


def create(cfg: SAEConfig, seed: int = 0) -> SAE:
    """A freshly initialised SAE of `cfg.architecture` (SAELens's initialisation)."""
    return get(cfg.architecture)(cfg, rngs=nnx.Rngs(seed))


for _cls in (StandardSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE):
    register(_cls)
