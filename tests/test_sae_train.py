"""The activation store (equal to the model's MLP capture, seeded, resumable) and the SAE trainer:
a CLI pulse, one-line errors, loss and L0 that respond, interrupted == uninterrupted bitwise, and
8 devices == 1 device."""

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxlm.checkpoint import load_model
from jaxlm.cli import main as jaxlm_main
from jaxlm.data.pipeline import make_loader
from jaxlm.train.metrics_log import read_metrics
from sae import activations as act_mod
from sae.activations import ActivationStore
from sae.train import load_config, train

LAYER = 3


def main(argv: list[str]) -> int:
    return jaxlm_main(["sae", *argv])


# the closing evaluation on one batch of 8 rows: these tests are about training
FAST = ["--set", "log.progress=false", "--set", "log.plot=false", "--set", "eval.rows=8"]


@pytest.fixture(scope="module")
def model_dir(demo_data, tmp_path_factory):
    d = tmp_path_factory.mktemp("sae_model") / "m"
    assert jaxlm_main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--tokenizer",
                       str(demo_data["tok"]), "--out", str(d)]) == 0  # fmt: skip
    return d


def _store(model_dir, data, **kw):
    model, _ = load_model(model_dir)
    args = dict(context_size=16, store_batch_size_prompts=8, n_batches_in_buffer=3,
                train_batch_size_tokens=64, seed=7)  # fmt: skip
    return ActivationStore(model, LAYER, [(str(data), 1.0)], **{**args, **kw}), model


def test_store_serves_the_models_mlp_activations(model_dir, demo_data):
    store, model = _store(model_dir, demo_data["translated"], train_batch_size_tokens=384)
    batch = np.asarray(next(store))  # one fill = 3 forwards x 8 contexts x 16 tokens = 384 rows
    loader = make_loader([(str(demo_data["translated"]), 1.0)], split="train", batch_size=4,
                         seed=7, slice_global_batch=True)  # fmt: skip
    want = []
    for _ in range(3):
        rows = next(loader)["tokens"][:, :32].reshape(-1, 16)  # 2 contexts per row of 32
        cap = model.mlp_activations(rows, (LAYER,))
        want.append(np.asarray(cap[LAYER]).reshape(-1, 256))
    want = np.concatenate(want)
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 (shuffled: compare as sets of rows)
    np.testing.assert_allclose(order(batch), order(want), atol=1e-6, rtol=1e-6)
    assert not np.array_equal(batch, want)  # and shuffled


@pytest.mark.parametrize("prefetch", [False, True])
def test_store_is_seeded_and_resumes_exactly(model_dir, demo_data, prefetch):
    """Also with the next fill read ahead: cut where 2 of its 3 forwards were read, and where all
    were; resumed without read-ahead, the same batches."""
    a, _ = _store(model_dir, demo_data["translated"])
    ref = [np.asarray(next(a)) for _ in range(13)]  # 6 batches per fill: crosses two fills
    b, _ = _store(model_dir, demo_data["translated"], prefetch=prefetch)
    assert all(np.array_equal(np.asarray(next(b)), r) for r in ref[:4])
    for cut in (4, 6):  # mid-fill and at a fill boundary
        c, _ = _store(model_dir, demo_data["translated"], prefetch=prefetch)
        for _ in range(cut):
            next(c)
        state = json.loads(json.dumps(c.get_state()))
        d, _ = _store(model_dir, demo_data["translated"], prefetch=not prefetch)
        d.set_state(state)
        assert all(np.array_equal(np.asarray(next(d)), r) for r in ref[cut:])
    other, _ = _store(model_dir, demo_data["translated"], seed=8)
    assert not np.array_equal(np.asarray(next(other)), ref[0])


def _cfg(model_dir, data, tokens=64 * 12, **over):
    """64-token batches; the closing evaluation on one batch of 8 rows."""
    sets = {"model": {"path": str(model_dir), "layer": LAYER},
            "data": {"sources": [{"path": str(data)}], "context_size": 16,
                     "store_batch_size_prompts": 8, "n_batches_in_buffer": 2,
                     "train_batch_size_tokens": 64, "training_tokens": tokens},
            "log": {"every": 1, "progress": False, "plot": False},
            "checkpoint": {"every": 3, "async_save": False},
            "eval": {"rows": 8}}  # fmt: skip
    from jaxlm.overlay import merge

    return load_config(None, [merge(sets, over)])


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl")}


def test_cli_has_a_pulse(model_dir, demo_data, tmp_path, capsys):
    out = tmp_path / "sae"
    assert main(["train", "--model", str(model_dir), "--layer", str(LAYER), "--data",
                 str(demo_data["translated"]), "--out", str(out), "--config",
                 "configs/sae/tiny.yaml", "--training-tokens", "512", *FAST]) == 0  # fmt: skip
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["step"] == 2 and np.isfinite(res["loss"])
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["d_in"] == 256 and cfg["d_sae"] == 1024 and cfg["jaxlm"]["layer"] == LAYER
    assert _eval_paths(out) == {str(demo_data["translated"])}


def _eval_paths(out) -> set[str]:
    return {s["path"] for s in json.loads((out / "eval.json").read_text())["sources"].values()}


def test_eval_data_replaces_the_training_sources_in_the_evaluation(model_dir, demo_data, tmp_path):
    """`--eval-data`: the trained SAE is scored on those rows; a rerun evaluating elsewhere
    resumes the same run (evaluation is not part of its identity)."""
    out = tmp_path / "sae"
    argv = ["train", "--model", str(model_dir), "--layer", str(LAYER), "--data",
            str(demo_data["translated"]), "--out", str(out), "--config", "configs/sae/tiny.yaml",
            "--training-tokens", "512", *FAST]  # fmt: skip
    assert main([*argv, "--eval-data", str(demo_data["native"])]) == 0
    assert _eval_paths(out) == {str(demo_data["native"])}
    assert json.loads((out / "eval.json").read_text())["pooled"]["rows"] == 8
    assert main([*argv, "--eval-data", str(demo_data["translated"]), "--eval-data",
                 str(demo_data["native"])]) == 0  # fmt: skip
    assert _eval_paths(out) == {str(demo_data[k]) for k in ("translated", "native")}


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--model", "/nonexistent/m"], "/nonexistent/m"),
        (["--set", "sae.l1_coefficent=2"], "l1_coefficent"),
        (["--layer", "8"], "model.layer=8"),
        (["--eval-data", "/nonexistent/d"], "/nonexistent/d"),
    ],
)
def test_bad_input_is_one_line(model_dir, demo_data, tmp_path, capsys, flags, needle):
    base = {"--model": str(model_dir), "--layer": str(LAYER)}
    argv = ["train", "--data", str(demo_data["translated"]), "--out", str(tmp_path / "o"),
            "--config", "configs/sae/tiny.yaml", *FAST]  # fmt: skip
    for k, v in base.items():
        if k not in flags:
            argv += [k, v]
    assert main(argv + flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_data_of_another_tokenizer_is_refused(model_dir, demo_data, tmp_path, capsys):
    """Activations of other token ids would train the SAE on nonsense, silently."""
    other = tmp_path / "other_tok"
    shutil.copytree(demo_data["native"], other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (other / "metadata.json").write_text(json.dumps(meta))
    argv = ["train", "--model", str(model_dir), "--layer", str(LAYER), "--out", str(tmp_path / "o"),
            "--config", "configs/sae/tiny.yaml", *FAST]  # fmt: skip
    assert main([*argv, "--data", str(other)]) == 2
    assert "is not the one the data was tokenised with" in capsys.readouterr().err
    assert main([*argv, "--data", str(demo_data["native"]), "--data", str(other)]) == 2
    assert "different tokenizers" in capsys.readouterr().err


def test_loss_falls_and_l1_lowers_l0(model_dir, demo_data, tmp_path):
    data, once = demo_data["translated"], {"every": 40}  # one checkpoint, at the end
    low = train(_cfg(model_dir, data, 64 * 40, optim={"lr": 3e-3}, checkpoint=once),
                tmp_path / "low")  # fmt: skip
    losses = _losses(tmp_path / "low")
    assert np.mean([losses[s] for s in range(36, 41)]) < 0.9 * np.mean(
        [losses[s] for s in (1, 2, 3)]
    )
    high = train(_cfg(model_dir, data, 64 * 40, optim={"lr": 3e-3}, sae={"l1_coefficient": 20.0},
                      checkpoint=once), tmp_path / "high")  # fmt: skip
    assert high["l0"] < 0.5 * low["l0"], (high["l0"], low["l0"])


def test_interrupted_run_resumes_bitwise(model_dir, demo_data, tmp_path, monkeypatch):
    data = demo_data["translated"]
    cfg = _cfg(model_dir, data, sae={"architecture": "batchtopk", "k": 8})
    train(cfg, tmp_path / "ref")

    real_next, calls = act_mod.ActivationStore.__next__, {"n": 0}

    def crash_at_8(self):
        calls["n"] += 1
        if calls["n"] > 7:  # step 8 never happens; the last checkpoint is step 6
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(act_mod.ActivationStore, "__next__", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    monkeypatch.setattr(act_mod.ActivationStore, "__next__", real_next)
    assert not (tmp_path / "run" / "cfg.json").exists()
    train(cfg, tmp_path / "run")  # the same command again: resumes from step 6
    a = load_file(str(tmp_path / "ref" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "run" / "sae_weights.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert _losses(tmp_path / "ref") == _losses(tmp_path / "run")


def _sae_cmd(model_dir, data, out, steps: int, every: int) -> list[str]:
    """`jaxlm sae train` as a child process: 64-token batches, a checkpoint every `every` steps."""
    sets = {"data.context_size": 16, "data.store_batch_size_prompts": 8,
            "data.n_batches_in_buffer": 2, "data.train_batch_size_tokens": 64,
            "data.training_tokens": 64 * steps, "checkpoint.every": every,
            "checkpoint.keep": 50, "log.every": 1, "log.progress": "false",
            "log.plot": "false", "eval.rows": 8}  # fmt: skip
    flags = [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "jaxlm.cli", "sae", "train", "--model", str(model_dir),
            "--layer", str(LAYER), "--data", str(data), "--out", str(out), *flags]  # fmt: skip


def _same_weights(a_dir, b_dir) -> bool:
    a = load_file(str(a_dir / "sae_weights.safetensors"))
    b = load_file(str(b_dir / "sae_weights.safetensors"))
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sae_run_killed_with_sigkill_resumes_to_the_same_weights(model_dir, demo_data, tmp_path):
    """kill -9 at a random step (between and during saves), then the same command again: the
    final SAE equals an uninterrupted run's, bitwise (the trainer skeleton's guarantee)."""
    data, steps = demo_data["translated"], 30
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users
    subprocess.run(_sae_cmd(model_dir, data, tmp_path / "ref", steps, 4), check=True, env=env,
                   capture_output=True, timeout=600)  # fmt: skip
    run = tmp_path / "run"
    kill_after = random.Random(0).randrange(6, 20)
    proc = subprocess.Popen(_sae_cmd(model_dir, data, run, steps, 4), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= kill_after:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "cfg.json").exists(), "killed too late: the run had finished"
    r = subprocess.run(_sae_cmd(model_dir, data, run, steps, 4), env=env, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from step" in r.stderr
    assert _same_weights(tmp_path / "ref", run)
    ref, got = _losses(tmp_path / "ref"), _losses(run)
    assert all(got[s] == ref[s] for s in ref)


def test_sae_run_falls_back_past_a_damaged_newest_checkpoint(
    model_dir, demo_data, tmp_path, monkeypatch, caplog
):
    """A torn newest checkpoint is set aside with a warning and the one before is resumed: the
    final SAE still equals an uninterrupted run's."""
    data = demo_data["translated"]
    cfg = _cfg(model_dir, data, 64 * 12, checkpoint={"every": 2, "keep": 10})
    train(cfg, tmp_path / "ref")
    real_next, calls = act_mod.ActivationStore.__next__, {"n": 0}

    def crash_at_8(self):
        calls["n"] += 1
        if calls["n"] > 7:  # checkpoints at steps 2, 4 and 6; step 8 never happens
            raise KeyboardInterrupt
        return real_next(self)

    monkeypatch.setattr(act_mod.ActivationStore, "__next__", crash_at_8)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "run")
    monkeypatch.setattr(act_mod.ActivationStore, "__next__", real_next)
    newest = tmp_path / "run" / "checkpoints" / "6"
    for f in (newest / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"\0" * 7)  # tear the newest checkpoint's array data
    with caplog.at_level("INFO"):
        train(cfg, tmp_path / "run")
    assert any("checkpoint 6 unreadable" in r.getMessage() for r in caplog.records)
    assert any("resumed from step 4" in r.getMessage() for r in caplog.records)
    assert len(list((tmp_path / "run" / "checkpoints.unreadable").iterdir())) == 1
    assert _same_weights(tmp_path / "ref", tmp_path / "run")


def test_sae_sigterm_saves_exits_75_and_resumes(model_dir, demo_data, tmp_path):
    data, run = demo_data["translated"], tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = _sae_cmd(model_dir, data, run, 4000, 1000)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline:
        if (run / "metrics.jsonl").exists() and max(_losses(run), default=0) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75  # saved, not finished: wrappers rerun the command
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
    saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved and 3 <= max(saved) < 4000 and not (run / "cfg.json").exists()


def test_normalised_training_folds_the_scale_and_a_rerun_changes_nothing(
    model_dir, demo_data, tmp_path
):
    """expected_average_only_in: trained on activations * scale, saved to take raw ones (the
    scale folded into the weights); the same command again returns the same final metrics."""
    from sae.io import load_sae

    out = tmp_path / "sae"
    cfg = _cfg(model_dir, demo_data["translated"], 64 * 4,
               sae={"normalize_activations": "expected_average_only_in"})  # fmt: skip
    data = dataclasses.replace(cfg.data, n_batches_for_norm_estimate=2)
    cfg = dataclasses.replace(cfg, data=data)
    first = train(cfg, out)
    saved = json.loads((out / "cfg.json").read_text())
    scale = saved["jaxlm"]["scaling_factor"]
    assert scale != 1.0 and saved["normalize_activations"] == "none"
    store, _ = _store(model_dir, demo_data["translated"])
    x = np.asarray(next(store))
    (sae, _), (ref, _) = load_sae(out), load_sae(out)
    ref.fold_activation_scale(1 / scale)  # back to the SAE as trained, on scaled inputs
    got, want = sae.decode(sae.encode(x)), ref.decode(ref.encode(x * scale)) / scale
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5, rtol=1e-4)
    assert first and train(cfg, out) == first
    assert json.loads((out / "cfg.json").read_text())["jaxlm"]["final_metrics"]


def test_eight_devices_equal_one(model_dir, demo_data, tmp_path):
    assert jax.device_count() == 8
    data = demo_data["translated"]
    one = train(_cfg(model_dir, data, 64 * 4, mesh={"devices": 1}), tmp_path / "one")
    eight = train(_cfg(model_dir, data, 64 * 4), tmp_path / "eight")
    a = load_file(str(tmp_path / "one" / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "eight" / "sae_weights.safetensors"))
    for k in a:
        np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
    np.testing.assert_allclose(one["loss"], eight["loss"], atol=1e-5, rtol=1e-5)
    assert (one["devices"], eight["devices"]) == (1, 8)  # each trained on the mesh it was given


def test_configs_parse_and_default_yaml_is_the_defaults():
    from sae.train import SAETrainConfig

    assert load_config("configs/sae/default.yaml") == SAETrainConfig()
    assert load_config("configs/sae/tiny.yaml").steps == 60


def test_store_over_eight_cpu_devices_does_not_deadlock(model_dir, demo_data):
    """Regression: a fill's FSDP forwards ran at once over 8 fake CPU devices and their
    all-gathers deadlocked XLA's in-process rendezvous ("7 of 8 arrived", an abort after 40 s)."""
    from jaxlm.sharding import make_mesh
    from sae.base import SAE_RULES

    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    mesh = make_mesh((1, -1, 1), jax.devices()[:8])
    model, _ = load_model(model_dir, mesh=mesh, rules=SAE_RULES)
    # the demo's store: the last layer (7 of ts-1m), 32 prompts a forward, 8 forwards a fill
    store = ActivationStore(model, 7, [(str(demo_data["translated"]), 1.0)],
                            context_size=None, store_batch_size_prompts=32, n_batches_in_buffer=8,
                            train_batch_size_tokens=1024, seed=7, mesh=mesh)  # fmt: skip
    batches = [next(store) for _ in range(240)]
    assert all(b.shape == (1024, 256) for b in batches)
    assert np.isfinite(np.asarray(batches[-1])).all()
