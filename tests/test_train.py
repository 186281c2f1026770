"""The trainer: a pulse, exact resume after kill -9, sharded == unsharded, NaN stop, SIGTERM,
fallback past a torn checkpoint, continual pre-training, and a golden loss trajectory."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import overlay
from jaxlm.checkpoint import load_model
from jaxlm.cli import main
from jaxlm.config import preset
from jaxlm.errors import UserError
from jaxlm.hf import to_hf_tensors
from jaxlm.model import init_model
from jaxlm.train.lm import (
    OptimSection,
    TrainConfig,
    load_config,
    make_optimizer,
    make_train_step,
    train,
)
from jaxlm.train.metrics_log import read_metrics

TINY = [
    "--preset", "ts-1m", "--batch-size", "8",
    "--set", "log.every=1", "--set", "log.progress=false", "--set", "log.tensorboard=false",
    "--set", "log.plot=false", "--set", "eval.batches=1",
]  # fmt: skip


def _argv(workdir, data, steps, *extra):
    return ["train", "--workdir", str(workdir), "--data", str(data), "--steps", str(steps),
            *TINY, *extra]  # fmt: skip


def _cmd(workdir, data, steps, *extra):
    return [sys.executable, "-m", "jaxlm.cli", *_argv(workdir, data, steps, *extra)]


def _params(workdir):
    model, info = load_model(workdir)
    return to_hf_tensors(model), info.step


def _crcs(workdir):
    return {r["step"]: r["data_crc"] for r in read_metrics(Path(workdir) / "metrics.jsonl")
            if "data_crc" in r}  # fmt: skip


def _saved_steps(workdir):
    """Steps of the finished checkpoints (Orbax renames a save's temporary folder when done)."""
    d = Path(workdir) / "checkpoints"
    return [int(p.name) for p in d.iterdir() if p.name.isdigit()] if d.is_dir() else []


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, demo_data):
    """A finished 4-step run with checkpoints at steps 2 and 4, trained once for the tests that
    resume it (each on its own copy) or continue pre-training from it (reading it only)."""
    wd = tmp_path_factory.mktemp("four_steps") / "wd"
    assert main(_argv(wd, demo_data["translated"], 4, "--checkpoint-every", "2")) == 0
    assert sorted(_saved_steps(wd)) == [2, 4]
    return wd


def _copy_of(four_steps, tmp_path):
    wd = tmp_path / "wd"
    shutil.copytree(four_steps, wd)
    return wd


def test_train_has_a_pulse(tmp_path, demo_data, capsys):
    wd = tmp_path / "wd"
    assert main(["train", "--workdir", str(wd), "--data", str(demo_data["translated"]),
                 "--steps", "2", *TINY, "--set", "log.plot=true"]) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2 and np.isfinite(out["loss"]) and np.isfinite(out["eval_loss"])
    assert (wd / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (wd / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    meta = json.loads((wd / "checkpoints/2/meta/metadata").read_text())
    assert meta["step"] == 2 and meta["config"]["steps"] == 2 and meta["tokenizer"]
    # the workdir knows its tokenizer, so text prompts work
    assert main(["generate", "--checkpoint", str(wd), "--prompt", "كان يا ما كان",
                 "--max-new-tokens", "5", "--json"]) == 0  # fmt: skip
    gen = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(gen["token_ids"]) <= 5 and isinstance(gen["text"], str)


@pytest.mark.slow
def test_kill_9_then_rerun_is_bitwise_equal(tmp_path, demo_data):
    steps, data = 14, demo_data["translated"]
    ref = tmp_path / "ref"  # uninterrupted and saved only at the end, in this process (8 devices)
    assert main(_argv(ref, data, steps, "--checkpoint-every", str(steps))) == 0

    wd = tmp_path / "killed"
    kill_at = random.Random(os.getpid()).randint(4, 11)
    proc = subprocess.Popen(_cmd(wd, data, steps, "--checkpoint-every", "3"))
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        done = max(_crcs(wd), default=0) if (wd / "metrics.jsonl").exists() else 0
        if done >= kill_at and _saved_steps(wd):  # past kill_at, with something to resume from
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    saved = max(_saved_steps(wd))
    rerun = subprocess.run(_cmd(wd, data, steps, "--checkpoint-every", "3"), check=True,
                           timeout=600, capture_output=True, text=True)  # fmt: skip
    assert f"resumed from step {saved} " in rerun.stderr  # resumed, not trained again from 0

    (a, step_a), (b, step_b) = _params(ref), _params(wd)
    assert step_a == step_b == steps
    for k in a:
        assert np.array_equal(a[k], b[k]), f"{k} differs after kill -9 at step {kill_at}"
    assert _crcs(ref) == _crcs(wd)  # the same batches, in the same order


def test_sharded_run_matches_one_device(tmp_path, demo_data):
    def losses(wd, *sets):
        cfg = load_config(None, [
            {"data": {"sources": [{"path": str(demo_data["translated"])}]}, "steps": 10,
             "batch_size": 8, "checkpoint": {"every": 10, "async_save": False},
             "log": {"every": 1, "progress": False, "tensorboard": False, "plot": False},
             "eval": {"batches": 1}}, *sets])  # fmt: skip
        train(cfg, wd)
        rows = read_metrics(wd / "metrics.jsonl")
        used = {r["devices"] for r in rows if "tokens_per_s" in r}
        return np.array([r["loss"] for r in rows if "data_crc" in r]), used

    one, used_one = losses(tmp_path / "one", {"mesh": {"shape": [1, 1, 1], "devices": 1}})
    eight, used_eight = losses(tmp_path / "eight", {"mesh": {"shape": [2, 2, 2]}})
    assert used_one == {1} and used_eight == {8}  # each run trained on the mesh it was given
    assert len(one) == len(eight) == 10
    np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)
    assert one[-1] < one[0]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, demo_data, four_steps, capsys):
    wd, data = _copy_of(four_steps, tmp_path), demo_data["translated"]
    # a NaN learning rate: step 5's loss is still finite, the parameters after its update are
    # not, and checkpointing every step must not save them as good
    capsys.readouterr()
    assert main(_argv(wd, data, 8, "--checkpoint-every", "1", "--set", "optim.lr=.nan")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "parameter norm after the update is not finite at step 5" in err, err
    assert "last good checkpoint is step 4" in err
    _, step = _params(wd)
    assert step == 4 and all(np.isfinite(v).all() for v in _params(wd)[0].values())


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path, demo_data):
    wd, data = tmp_path / "wd", demo_data["translated"]
    proc = subprocess.Popen(_cmd(wd, data, 2000, "--checkpoint-every", "1000"),
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline:
        if (wd / "metrics.jsonl").exists() and max(_crcs(wd), default=0) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75  # saved, not finished: wrappers rerun the command
    assert json.loads(out.strip().splitlines()[-1])["preempted"] is True
    _, step = _params(wd)
    assert 3 <= step < 2000


def test_unreadable_latest_checkpoint_falls_back(tmp_path, demo_data, four_steps, caplog):
    wd, data = _copy_of(four_steps, tmp_path), demo_data["translated"]
    for f in (wd / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"\0" * 7)  # tear the newest checkpoint's array data
    shutil.rmtree(wd / "checkpoints" / "4" / "opt_state")
    cfg = load_config(None, [{"data": {"sources": [{"path": str(data)}]}, "steps": 5,
                              "batch_size": 8, "checkpoint": {"every": 1, "async_save": False},
                              "log": {"progress": False, "tensorboard": False, "plot": False},
                              "eval": {"batches": 1}}])  # fmt: skip
    with caplog.at_level("INFO"):
        train(cfg, wd)
    assert any("checkpoint 4 unreadable" in r.getMessage() for r in caplog.records)
    assert any("resumed from step 2" in r.getMessage() for r in caplog.records)
    assert _params(wd)[1] == 5
    assert len(list((wd / "checkpoints.unreadable").iterdir())) == 1  # set aside, not deleted


def test_continual_pretraining_from_a_workdir(tmp_path, demo_data, four_steps, capsys):
    base, cpt = four_steps, tmp_path / "cpt"  # base: trained on translated, read only here
    mix = f"{demo_data['native']}:0.8"
    replay = f"{demo_data['translated']}:0.2"
    assert main(["train", "--workdir", str(cpt), "--init-from", str(base), "--data", mix,
                 "--data", replay, "--steps", "2", *TINY]) == 0  # fmt: skip
    rows = [r for r in read_metrics(cpt / "metrics.jsonl") if "data_crc" in r]
    assert [r["step"] for r in rows] == [1, 2]  # fresh optimizer and schedule
    base_params, _ = _params(base)
    cpt_params, _ = _params(cpt)
    assert not np.array_equal(
        base_params["transformer.wte.weight"], cpt_params["transformer.wte.weight"]
    )
    # data tokenised with another tokenizer would give the weights other token ids
    other = tmp_path / "other_tok"
    shutil.copytree(demo_data["native"], other)
    meta = json.loads((other / "metadata.json").read_text())
    meta["tokenizer"]["sha256"] = "0" * 64
    (other / "metadata.json").write_text(json.dumps(meta))
    capsys.readouterr()
    assert main(["train", "--workdir", str(tmp_path / "cpt2"), "--init-from", str(base), "--data",
                 str(other), "--steps", "1", *TINY]) == 2  # fmt: skip
    assert "is not the one the data was tokenised with" in capsys.readouterr().err
    # a refused start leaves nothing behind: the corrected command then runs in the same workdir
    cpt3 = ["train", "--workdir", str(tmp_path / "cpt3"), "--init-from", str(base), "--data",
            str(demo_data["native"]), "--steps", "1", *TINY]  # fmt: skip
    assert main([*cpt3, "--preset", "ts-3m"]) == 2
    assert "its architecture differs from model.preset=ts-3m" in capsys.readouterr().err
    assert main(cpt3) == 0


def test_cpt_without_a_preset_takes_the_source_models_architecture(tmp_path, demo_data):
    """configs/cpt/*.yaml name no preset: continual pre-training continues the model it is given
    (a ts-3m here), whatever its architecture; a fresh run without one is ts-1m."""
    from jaxlm.checkpoint import read_meta

    flags = [a for a in TINY if a not in ("--preset", "ts-1m")]
    base, cpt = tmp_path / "base", tmp_path / "cpt"
    assert main(["train", "--workdir", str(base), "--data", str(demo_data["translated"]),
                 "--steps", "1", *flags, "--preset", "ts-3m"]) == 0  # fmt: skip
    assert main(["train", "--workdir", str(cpt), "--init-from", str(base), "--data",
                 str(demo_data["native"]), "--steps", "1", "--config",
                 "configs/cpt/native.yaml", *flags, "--set", "model.dtype=float32",
                 "--set", "eval.every=0"]) == 0  # fmt: skip
    assert read_meta(cpt)[0] == read_meta(base)[0]
    fresh = tmp_path / "fresh"
    assert main(["train", "--workdir", str(fresh), "--data", str(demo_data["translated"]),
                 "--steps", "1", *flags]) == 0  # fmt: skip
    assert read_meta(fresh)[0].d_model == 64


def test_resume_refusals_keep_the_run(tmp_path, demo_data, four_steps, capsys):
    """A rerun whose config cannot resume the run says why and changes nothing: the checkpoints
    stay (not set aside as unreadable) and so does the run's config.json."""
    wd, data = _copy_of(four_steps, tmp_path), str(demo_data["translated"])
    config = (wd / "config.json").read_text()
    capsys.readouterr()
    assert main(["train", "--workdir", str(wd), "--data", data, "--steps", "6", *TINY,
                 "--set", "optim.clip_norm=0"]) == 2  # fmt: skip
    assert "another shape (optim.clip_norm differ" in capsys.readouterr().err
    assert main(["train", "--workdir", str(wd), "--data", data, "--steps", "6", *TINY,
                 "--preset", "ts-3m"]) == 2  # fmt: skip
    assert "was made with other settings (architecture.d_model 64 -> 128" in capsys.readouterr().err
    assert not (wd / "checkpoints.unreadable").exists()
    assert (wd / "config.json").read_text() == config
    # compute-only settings may change on resume; the lr as YAML reads 1e-4 (a string) too
    assert main(["train", "--workdir", str(wd), "--data", data, "--steps", "5", *TINY,
                 "--set", "model.remat=true", "--set", "optim.lr=1e-4"]) == 0  # fmt: skip
    assert _params(wd)[1] == 5
    assert main(["train", "--workdir", "gs://bucket/run", "--data", data, *TINY]) == 2
    assert "a file-system path" in capsys.readouterr().err
    # rows longer than the position table would be clamped onto its last entry, silently
    long = tmp_path / "long"
    shutil.copytree(data, long)
    meta = json.loads((long / "metadata.json").read_text())
    (long / "metadata.json").write_text(json.dumps({**meta, "seq_len": 4096}))
    assert main(["train", "--workdir", str(tmp_path / "wd2"), "--data", str(long), *TINY]) == 2
    assert "seq_len=4096 exceeds model ts-1m's 2048 positions" in capsys.readouterr().err


def test_a_partial_section_keeps_the_parents_own_defaults(tmp_path):
    """`log: {every: 50}` in an SAE config changes `every` only: the SAE trainer's own default
    (no TensorBoard; checkpoints every 1000) stays, not the section class's (it once turned
    TensorBoard on, importing torch and writing events every step, in the demo's SAE runs)."""
    from sae.train import SAETrainConfig
    from sae.train import load_config as load_sae

    cfg = tmp_path / "sae.yaml"
    cfg.write_text("log: {every: 50}\ncheckpoint: {keep: 2}\n")
    c = load_sae(cfg)
    assert (c.log.every, c.log.tensorboard) == (50, False)
    assert (c.checkpoint.keep, c.checkpoint.every) == (2, SAETrainConfig().checkpoint.every)
    assert load_sae(None, [{"log": {"tensorboard": True}}]).log.tensorboard
    with pytest.raises(UserError, match=r"sae.yaml.log: unknown key 'evry'"):
        cfg.write_text("log: {evry: 5}\n")
        load_sae(cfg)


def test_config_errors_are_one_line(tmp_path, demo_data):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lrr: 0.1\n")
    with pytest.raises(UserError, match=r"c.yaml.optim: unknown key 'lrr'"):
        load_config(cfg)
    # a --set typo is named as the --set, not as the YAML file it would be merged into
    with pytest.raises(UserError, match=r"^--set optim.lrr=1: optim has no key 'lrr'; known"):
        overlay.parse_override("optim.lrr=1", TrainConfig)
    with pytest.raises(UserError, match=r"^--set optimm.lr=1: the config has no key 'optimm'"):
        overlay.parse_override("optimm.lr=1", TrainConfig)
    assert overlay.parse_override("data.sources=[]", TrainConfig) == {"data": {"sources": []}}
    with pytest.raises(UserError, match="must be a positive multiple of grad_accum=3"):
        load_config(None, [{"batch_size": 8, "grad_accum": 3}])
    with pytest.raises(UserError, match="'sgd' is not one of 'constant', 'cosine'"):
        load_config(None, [{"optim": {"schedule": "sgd"}}])
    cfg.write_text("checkpoint:\n  keep: 0\n")
    with pytest.raises(UserError, match=r"c.yaml: checkpoint.keep=0 must be >= 1"):
        load_config(cfg)
    with pytest.raises(UserError, match=r"data.sources\[1\] \(b\): weight 0.0 must be > 0"):
        load_config(None, [{"data": {"sources": [{"path": "a"}, {"path": "b", "weight": 0}]}}])
    with pytest.raises(UserError, match="eval.batches must be >= 1"):
        load_config(None, [{"eval": {"batches": 0}}])
    assert load_config(None, [{"optim": {"lr": "1e-4"}}]).optim.lr == 1e-4
    with pytest.raises(UserError, match="optim.lr: expected float, got 'fast'"):
        load_config(None, [{"optim": {"lr": "fast"}}])
    # a cosine schedule without warmup starts at the peak, not at 0
    _, lr = make_optimizer(OptimSection(schedule="cosine"), 10)
    assert float(lr(0)) == pytest.approx(5e-4)


def test_every_yaml_in_configs_parses():
    root = Path(__file__).resolve().parents[1] / "configs"
    found = [p for p in root.rglob("*.yaml") if p.name != "sharding.yaml"]
    assert found
    from jaxlm.pipeline.config import load as load_pipeline_config
    from sae.train import load_config as load_sae_config

    for p in found:
        if "sae" in p.parts or p.name == "sae.yaml":  # SAE training configs
            load_sae_config(p)
        elif "pipeline" in p.parts or "paper" in p.parts:  # whole-method configs
            load_pipeline_config(p)
        else:
            load_config(p)


def test_grad_accumulation_equals_one_big_batch():
    from flax import nnx

    cfg = preset("ts-1m", vocab_size=128)
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    import optax

    tx = optax.sgd(1.0)  # plain SGD: Adam's first step would amplify float rounding near g = 0
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 128, (8, 33)))
    outs = []
    for accum in (1, 4):
        step = jax.jit(make_train_step(graphdef, tx, accum))
        p, _, m = step(params, tx.init(params), tokens)
        outs.append((jax.tree.leaves(p), float(m["loss"])))
    assert abs(outs[0][1] - outs[1][1]) < 1e-6
    for a, b in zip(outs[0][0], outs[1][0], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)  # = the gradients within 1e-6


# 10 steps on fixed synthetic tokens: catches silent changes to the loss, optimizer or model.
GOLDEN = [4.8668, 4.4638, 4.2812, 4.1556, 3.9912, 3.8742, 3.7658, 3.6733, 3.5854, 3.5021]


def test_golden_loss_trajectory():
    from flax import nnx

    cfg = preset("ts-1m", vocab_size=128)
    graphdef, params = nnx.split(init_model(cfg, 0), nnx.Param)
    tx, _ = make_optimizer(OptimSection(lr=1e-3), 10)
    opt = tx.init(params)
    step = jax.jit(make_train_step(graphdef, tx, 1))
    rs = np.random.RandomState(0)
    base = rs.randint(0, 128, (1, 33))
    losses = []
    for _ in range(10):
        tokens = np.repeat(base, 8, 0)  # one repeated sequence: the loss must fall
        params, opt, m = step(params, opt, jnp.asarray(tokens))
        losses.append(float(m["loss"]))
    np.testing.assert_allclose(losses, GOLDEN, atol=2e-3, rtol=0)
