"""The SAE trainer's step compiled ahead of time for a TPU topology (sae/aot.py; needs libtpu).

The abstract state must be the trainer's: the shardings `sae.train._init_state` gives the real
arrays on 8 CPU devices are the ones the AOT builder gives the ShapeDtypeStructs, so the plan is
the plan of the program that trains.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import pytest

from jaxlm import aot
from jaxlm.sharding import make_mesh
from sae.aot import build_sae_step, sae_config
from sae.train import _init_state, _rules

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(), reason='libtpu not installed (pip install "jax[tpu]")'
)
F, S, N = 256, 1024, 256  # a small SAE: input width, latents, rows per step


def _specs(tree) -> list:
    return [x.sharding.spec for x in jax.tree.leaves(tree)]


def test_abstract_state_is_the_trainers_on_cpu_devices():
    cfg = sae_config(F, S, N, "topk")
    mesh = make_mesh((1, -1, 1))
    _, real, _ = _init_state(cfg.sae, cfg, mesh, _rules(cfg))
    _, args = build_sae_step(cfg, mesh, n_layers=2)
    states, x_lnf, _, scale_l = args
    assert len(states) == 2 and x_lnf.shape == (2, N, F) and scale_l.shape == (2,)
    for state in states:
        assert [x.shape for x in jax.tree.leaves(state)] == [x.shape for x in jax.tree.leaves(real)]
        assert _specs(state) == _specs(real)


@needs_libtpu
@pytest.mark.parametrize("architecture", ["standard", "topk"])
def test_sae_step_compiles_for_v5e_8(architecture, capsys):
    sys.path.insert(0, str(ROOT))
    from tpu import aot_check

    flags = ["--sae-d-in", str(F), "--sae-latents", str(S), "--sae-batch", str(N)]
    assert aot_check.main(["--topology", "v5e-8", *flags, "--sae-architecture", architecture]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["devices"] == 8 and report["mesh"]["fsdp"] == 8
    assert 0 < report["hbm_used_gib"] < report["hbm_capacity_gib"] == 16.0
    # The weights (2 x F x S fp32) are split over the 8 chips, latents on fsdp
    assert report["argument_bytes"] >= 2 * F * S * 4 // 8
    assert report["alias_bytes"] > 0  # the SAE's state is donated, as in training
    # Encoder and decoder, forward and backward, on this chip's S/8 latents: ~3 x 2 x 2NFS/8
    assert report["flops"] >= 0.9 * 3 * 2 * 2 * N * F * S / 8


def test_sae_flags_usage_errors_are_one_line(capsys):
    sys.path.insert(0, str(ROOT))
    from tpu import aot_check

    argv = ["--topology", "v5e-8", "--sae-latents", "64", "--global-batch", "8"]
    assert aot_check.main(argv) == 2
    err = capsys.readouterr().err
    assert "--sae-batch" in err and err.count("\n") == 1
