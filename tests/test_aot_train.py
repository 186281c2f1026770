"""The real jaxlm train step, compiled ahead of time for a TPU topology (needs libtpu, no TPU)."""

import json
import sys
from pathlib import Path

import pytest

from jaxlm import aot

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(
    not aot.libtpu_available(), reason='libtpu not installed (pip install "jax[tpu]")'
)
def test_pretrain_config_compiles_for_v5e_8(capsys):
    sys.path.insert(0, str(ROOT))
    from tpu import aot_check

    # the preset: TrainConfig's default, ts-1m; one sequence per chip (the same program as the
    # config's 384, compiled in about two thirds of the time)
    cfg = ROOT / "configs/pretrain.yaml"
    assert aot_check.main(["--topology", "v5e-8", "--config", str(cfg), "--global-batch", "8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fits"] and report["devices"] == 8 and report["mesh"]["fsdp"] == 8
    assert 0 < report["hbm_used_gib"] < report["hbm_capacity_gib"]
    assert report["flops"] > 0
