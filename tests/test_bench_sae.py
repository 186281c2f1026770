"""scripts/bench_sae.py on tiny shapes: a line per (architecture, impl) with every key, then the
ratios; both impls start from the same weights and take the same steps, so their losses agree."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("sae_lens") is None:  # its package root needs wandb: not imported
    pytest.skip("sae-lens is not installed (make test installs it)", allow_module_level=True)

SCRIPT = Path(__file__).parents[1] / "scripts" / "bench_sae.py"
KEYS = {"impl", "device", "architecture", "d_in", "d_sae", "batch", "dtype", "vectors_per_s",
        "step_ms", "step_ms_min", "compute_dtype", "compile_s", "loss", "fp32_matmul"}  # fmt: skip
TINY = ["--shapes", "16x64", "--batch", "32", "--k", "4", "--steps", "2", "--rounds", "2",
        "--warmup", "1"]  # fmt: skip


def test_bench_sae_prints_every_key_for_both_impls_and_the_ratios():
    argv = [sys.executable, str(SCRIPT), *TINY, "--architectures", "standard,topk"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
    *lines, summary = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["architecture"], r["impl"]) for r in lines] == [
        ("standard", "jaxlm"), ("standard", "saelens"), ("topk", "jaxlm"), ("topk", "saelens")
    ]  # fmt: skip
    for r in lines:
        assert KEYS <= set(r), (r, KEYS - set(r))
        assert (r["d_in"], r["d_sae"], r["batch"], r["dtype"]) == (16, 64, 32, "float32")
        assert r["vectors_per_s"] > 0 and r["step_ms_min"] <= r["step_ms"]
    for arch in ("standard", "topk"):  # the same 1 + 1 + 2 * 2 steps from the same weights
        jaxlm, saelens = (r["loss"] for r in lines if r["architecture"] == arch)
        assert jaxlm == pytest.approx(saelens, rel=1e-4)
    assert set(summary["ratios"]) == {"standard 16x64 float32", "topk 16x64 float32"}
    assert all(v > 0 for v in summary["ratios"].values())


def test_bad_shape_and_architecture_are_refused(capsys):
    spec = importlib.util.spec_from_file_location("bench_sae", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.parse_shapes("768x12288,3072x12288") == [(768, 12288), (3072, 12288)]
    for flags, needle in ((["--shapes", "16by64"], "D_INxD_SAE"),
                          (["--architectures", "gated"], "choose from")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            bench.main(flags)
        assert e.value.code == 2 and needle in capsys.readouterr().err


def test_with_dead_latents_both_impls_take_the_same_steps():
    """--dead: AuxK runs from the first step, on every dead latent (3, fewer than k_aux = 8:
    jaxlm's gather without a top-k) or on the top 8 of them (12); the losses still agree."""
    for dead in (3, 12):
        argv = [sys.executable, str(SCRIPT), *TINY, "--architectures", "topk", "--dead", str(dead)]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=True).stdout
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")][:-1]
        assert [r["dead"] for r in lines] == [dead, dead]
        jaxlm, saelens = (r["loss"] for r in lines)
        assert jaxlm == pytest.approx(saelens, rel=1e-4), dead
