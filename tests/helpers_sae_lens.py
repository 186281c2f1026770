"""SAELens 6.54.12 (PyTorch) as the parity reference, imported without its heavy package root.

`sae_lens/__init__.py` pulls in wandb, datasets and the training runners; the SAE classes need only
torch, transformer_lens' HookPoint and einops. So the package is registered as a bare namespace
(its real directory, its real version) and the four architectures are registered as its
`__init__` registers them. Skips the calling test when sae-lens is not installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import sys
import types

import pytest

VERSION = "6.54.12"


def sae_lens():
    """The sae_lens namespace with standard, topk, batchtopk and jumprelu registered."""
    if "sae_lens.saes.sae" in sys.modules:
        return sys.modules["sae_lens"]
    spec = importlib.util.find_spec("sae_lens")
    if spec is None:
        pytest.skip("sae-lens is not installed (make test installs it)")
    pkg = types.ModuleType("sae_lens")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__version__ = VERSION
    pkg.logger = logging.getLogger("sae_lens")
    sys.modules["sae_lens"] = pkg
    from sae_lens.registry import register_sae_class, register_sae_training_class
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.jumprelu_sae import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
    )
    from sae_lens.saes.standard_sae import (
        StandardSAE,
        StandardSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
    )
    from sae_lens.saes.topk_sae import (
        TopKSAE,
        TopKSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )

    register_sae_class("standard", StandardSAE, StandardSAEConfig)
    register_sae_training_class("standard", StandardTrainingSAE, StandardTrainingSAEConfig)
    register_sae_class("topk", TopKSAE, TopKSAEConfig)
    register_sae_training_class("topk", TopKTrainingSAE, TopKTrainingSAEConfig)
    register_sae_class("jumprelu", JumpReLUSAE, JumpReLUSAEConfig)
    register_sae_training_class("jumprelu", JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig)
    register_sae_training_class("batchtopk", BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)
    assert importlib.metadata.version("sae-lens") == VERSION
    return pkg


def training_class(architecture: str):
    """(TrainingSAE class, its config class) for an architecture name."""
    sae_lens()
    from sae_lens.registry import get_sae_training_class

    return get_sae_training_class(architecture)
