"""SAEs on several layers from one forward pass (`model.layers`): each layer's SAE is the one a
one-layer run with the same seed trains, saved as that run saves it, and the several-layer run
resumes exactly (past a torn checkpoint, and after SIGTERM through the CLI)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm.checkpoint import load_model
from jaxlm.cli import main as jaxlm_main
from jaxlm.overlay import merge
from jaxlm.train.metrics_log import read_metrics
from sae import activations as act_mod
from sae.activations import ActivationStore
from sae.train import load_config, train

LAYERS = (1, 4)  # not the last layer: the forward stops after layer 4


@pytest.fixture(scope="module")
def model_dir(demo_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_multi_model") / "m"
    assert jaxlm_main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--tokenizer",
                       str(demo_data["tok"]), "--out", str(d)]) == 0  # fmt: skip
    return d


def _cfg(model_dir, datadir, steps: int, model: dict, **over):
    """64-token batches, fills of 4 batches (2 forwards x 8 contexts x 16 tokens); the closing
    evaluation on one batch of 8 rows (what these tests prove does not depend on its size)."""
    sets = {"model": {"path": str(model_dir), **model},
            "data": {"sources": [{"path": str(datadir)}], "context_size": 16,
                     "store_batch_size_prompts": 8, "n_batches_in_buffer": 2,
                     "train_batch_size_tokens": 64, "training_tokens": 64 * steps},
            "log": {"every": 1, "progress": False, "plot": False},
            "checkpoint": {"every": 3, "async_save": False}, "eval": {"rows": 8}}  # fmt: skip
    return load_config(None, [merge(sets, over)])


def _weights(d):
    return load_file(str(d / "sae_weights.safetensors"))


def _losses(d):
    return {r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl")}


def test_stacked_store_serves_each_layers_own_batches(model_dir, demo_data):
    """One forward, one permutation: layer l's rows are what a store of layer l alone serves
    (whether or not it reads the next fill ahead)."""
    model, _ = load_model(model_dir)
    args = dict(context_size=16, store_batch_size_prompts=8, n_batches_in_buffer=2,
                train_batch_size_tokens=64, seed=7)  # fmt: skip
    src = [(str(demo_data["translated"]), 1.0)]
    both = ActivationStore(model, LAYERS, src, **args)
    got = [np.asarray(next(both)) for _ in range(6)]  # [L, N, F], across a fill boundary
    assert got[0].shape == (2, 64, 256)
    for i, layer in enumerate(LAYERS):  # with the next fill read ahead, and without
        alone = ActivationStore(model, layer, src, prefetch=i == 1, **args)
        assert all(np.array_equal(np.asarray(next(alone)), g[i]) for g in got)


def test_each_layers_sae_equals_its_one_layer_run(model_dir, demo_data, tmp_path):
    """The same steps, seed and data order: weights within 1e-5 (bitwise on CPU, in fact), and
    each layer's directory is what the one-layer run writes (cfg.json with its layer, sparsity,
    metrics, a train_config.json that reruns it alone). Per-layer normalisation factors too."""
    data, steps = demo_data["translated"], 7
    over = {"sae": {"normalize_activations": "expected_average_only_in"},
            "data": {"n_batches_for_norm_estimate": 2}}  # fmt: skip
    multi = train(_cfg(model_dir, data, steps, {"layers": list(LAYERS)}, **over), tmp_path / "m")
    assert not (tmp_path / "m" / "cfg.json").exists()
    for layer in LAYERS:
        alone = train(
            _cfg(model_dir, data, steps, {"layer": layer}, **over), tmp_path / f"a{layer}"
        )
        a, m = tmp_path / f"a{layer}", tmp_path / "m" / f"layer-{layer}"
        wa, wm = _weights(a), _weights(m)
        assert sorted(wa) == sorted(wm)
        for k in wa:
            np.testing.assert_allclose(wm[k], wa[k], rtol=0, atol=1e-5, err_msg=f"{layer} {k}")
        np.testing.assert_allclose(multi[f"layer-{layer}/loss"], alone["loss"], atol=1e-5)
        la, lm = _losses(a), _losses(m)
        assert sorted(la) == sorted(lm) == list(range(1, steps + 1))
        np.testing.assert_allclose([lm[s] for s in la], list(la.values()), rtol=1e-5)
        ca, cm = (json.loads((d / "cfg.json").read_text())["jaxlm"] for d in (a, m))
        assert cm["layer"] == layer and cm["scaling_factor"] == pytest.approx(ca["scaling_factor"])
        assert cm["final_metrics"]["l0"] == pytest.approx(ca["final_metrics"]["l0"], abs=1e-5)
        assert (m / "sparsity.safetensors").is_file()
        rerun = json.loads((m / "train_config.json").read_text())["model"]
        assert rerun == {"path": str(model_dir), "layer": layer, "layers": []}


def _crash_at(monkeypatch, n: int) -> None:
    real_next, calls = act_mod.ActivationStore.__next__, {"n": 0}

    def crash(self):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(act_mod.ActivationStore, "__next__", crash)


def test_several_layers_resume_exactly_past_a_torn_checkpoint(
    model_dir, demo_data, tmp_path, monkeypatch, caplog
):
    """Killed after step 7 (checkpoints at 2, 4, 6, each holding both SAEs), the newest torn:
    the rerun sets it aside, resumes from 4 and ends bitwise equal to an uninterrupted run."""
    cfg = _cfg(model_dir, demo_data["translated"], 10, {"layers": [0, 3]},
               sae={"architecture": "batchtopk", "k": 8},
               checkpoint={"every": 2, "keep": 10})  # fmt: skip
    ref = train(cfg, tmp_path / "ref")
    with monkeypatch.context() as mp:
        _crash_at(mp, 7)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "run")
    newest = tmp_path / "run" / "checkpoints" / "6"
    for f in (newest / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"\0" * 7)  # tear the newest checkpoint's array data
    with caplog.at_level("INFO"):
        got = train(cfg, tmp_path / "run")
    assert any("checkpoint 6 unreadable" in r.getMessage() for r in caplog.records)
    assert any("resumed from step 4" in r.getMessage() for r in caplog.records)
    for i in (0, 3):
        a, b = tmp_path / "ref" / f"layer-{i}", tmp_path / "run" / f"layer-{i}"
        wa, wb = _weights(a), _weights(b)
        assert all(np.array_equal(wa[k], wb[k]) for k in wa), i
        assert _losses(a) == _losses(b)
    assert {k: v for k, v in got.items() if "time" not in k and "tokens_per_s" not in k} == {
        k: v for k, v in ref.items() if "time" not in k and "tokens_per_s" not in k
    }


def _cli(model_dir, data, out, steps: int) -> list[str]:
    sets = {"data.context_size": 16, "data.store_batch_size_prompts": 8,
            "data.n_batches_in_buffer": 2, "data.train_batch_size_tokens": 64,
            "data.training_tokens": 64 * steps, "checkpoint.every": 1000, "log.every": 1,
            "log.progress": "false", "log.plot": "false", "eval.rows": 8}  # fmt: skip
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "jaxlm.cli", "sae", "train", "--model", str(model_dir),
            "--layers", ",".join(map(str, LAYERS)), "--data", str(data), "--out", str(out),
            *flags]  # fmt: skip


@pytest.mark.slow
def test_several_layers_sigterm_saves_and_the_rerun_finishes(model_dir, demo_data, tmp_path):
    """`jaxlm sae train --layers`: SIGTERM saves one checkpoint of both SAEs and exits 75; the
    same command again resumes and finishes, each SAE equal to an uninterrupted run's."""
    data, run, steps = demo_data["translated"], tmp_path / "run", 100
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users
    proc = subprocess.Popen(_cli(model_dir, data, run, steps), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "layer-4" / "metrics.jsonl").exists() and max(
            _losses(run / "layer-4"), default=0
        ) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, "finished before SIGTERM"
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
    r = subprocess.run(_cli(model_dir, data, run, steps), env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0 and "resumed from step" in r.stderr, r.stderr[-2000:]
    cfg = _cfg(model_dir, data, steps, {"layers": list(LAYERS)}, mesh={"devices": 1},
               checkpoint={"every": 1000})  # fmt: skip
    train(cfg, tmp_path / "ref")
    for layer in LAYERS:
        a, b = tmp_path / "ref" / f"layer-{layer}", run / f"layer-{layer}"
        wa, wb = _weights(a), _weights(b)
        for k in wa:
            np.testing.assert_allclose(wb[k], wa[k], rtol=0, atol=1e-5, err_msg=f"{layer} {k}")
        assert json.loads((b / "cfg.json").read_text())["jaxlm"]["layer"] == layer


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--layers", "1,9"], "model.layers=9"),
        (["--layers", "1,x"], "--layers '1,x'"),
        (["--layers", "1,1"], "names a layer twice"),
        (["--layers", "1", "--layer", "2"], "pass one"),
        (["--set", "model.layer=2", "--set", "model.layers=[1]"], "set one of them"),
    ],
)
def test_bad_layers_are_one_line(model_dir, demo_data, tmp_path, capsys, flags, needle):
    argv = ["sae", "train", "--model", str(model_dir), "--data", str(demo_data["translated"]),
            "--out", str(tmp_path / "o"), "--config", "configs/sae/tiny.yaml", *flags]  # fmt: skip
    assert jaxlm_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_layers_all_is_every_layer_and_layer_alone_is_one():
    from sae.train import ModelSection

    assert ModelSection(layers="all").resolve(8) == tuple(range(8))
    assert ModelSection(layers=(5, 2)).resolve(8) == (2, 5) and ModelSection(layers=(5,)).multi
    assert ModelSection(layer=3).resolve(8) == (3,) and not ModelSection(layer=3).multi
