"""The trainers own their workdirs (jaxlm.outputs): a second trainer is refused while the first
runs and the first ends as if alone; a rerun with other settings is refused and changes nothing;
a full disk stops the run in one line and keeps the last good checkpoint."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.checkpoint import load_model
from jaxlm.cli import main
from jaxlm.hf import to_hf_tensors

FAST = ["--preset", "ts-1m", "--batch-size", "8", "--set", "log.every=1",
        "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "log.plot=false", "--set", "eval.batches=1"]  # fmt: skip
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it


def _cmd(workdir, data, steps, *extra):
    return [sys.executable, "-m", "jaxlm.cli", "train", "--workdir", str(workdir), "--data",
            str(data), "--steps", str(steps), *FAST, *extra]  # fmt: skip


def _tree_hash(root: Path) -> str:
    """Every file's path and bytes under `root`, hashed (and the lock file beside it excluded)."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.mark.slow
def test_a_second_trainer_is_refused_and_the_first_ends_as_if_alone(tmp_path, demo_data):
    data, steps = demo_data["translated"], 150
    lone, wd = tmp_path / "lone", tmp_path / "wd"
    cmd = _cmd(wd, data, steps, "--checkpoint-every", "50")
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None:  # until it trains (holds the lock)
        if (wd / "metrics.jsonl").exists() and (wd / "metrics.jsonl").stat().st_size:
            break
        time.sleep(0.05)
    assert first.poll() is None, "the first trainer ended before the second could start"
    second = subprocess.run(_cmd(wd, data, steps, "--set", "seed=1"), env=ENV,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert first.poll() is None, "the test needs the first trainer still running here"
    err = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(err) == 1, second.stderr[-2000:]
    assert f"{wd} is being written by pid {first.pid}" in err[0]
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    subprocess.run(_cmd(lone, data, steps, "--checkpoint-every", "50"), env=ENV, check=True,
                   capture_output=True, timeout=600)  # fmt: skip
    (a, step_a), (b, step_b) = load_model(lone), load_model(wd)
    assert step_a.step == step_b.step == steps
    ta, tb = to_hf_tensors(a), to_hf_tensors(b)
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)  # bitwise a lone run's result
    rows = [json.loads(x) for x in (wd / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["step"] for r in rows if "data_crc" in r) == list(range(1, steps + 1))


def test_a_rerun_with_other_settings_is_refused_and_changes_nothing(tmp_path, demo_data, capsys):
    data, wd = str(demo_data["translated"]), tmp_path / "wd"
    assert main(["train", "--workdir", str(wd), "--data", data, "--steps", "2", *FAST]) == 0
    before = _tree_hash(wd)
    capsys.readouterr()
    changes = {
        "seed": ["--set", "seed=3"],
        "batch_size": ["--batch-size", "16"],
        "architecture": ["--preset", "ts-3m"],
        "data": ["--data", str(demo_data["native"])],
    }
    for what, flags in changes.items():
        argv = ["train", "--workdir", str(wd), "--data", data, "--steps", "3", *FAST, *flags]
        if what == "data":
            argv = ["train", "--workdir", str(wd), "--steps", "3", *FAST, *flags]
        assert main(argv) == 2, what
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was made with other settings" in err[0], (what, err)
        assert what in err[0], (what, err[0])
        assert _tree_hash(wd) == before, what  # nothing on disk changed
    # --overwrite starts over with the new settings
    assert main(["train", "--workdir", str(wd), "--data", data, "--steps", "1", *FAST,
                 "--set", "seed=3", "--overwrite"]) == 0  # fmt: skip
    assert json.loads((wd / "identity.json").read_text())["identity"]["seed"] == 3


def test_a_full_disk_stops_in_one_line_and_keeps_the_last_good_checkpoint(
    tmp_path, demo_data, small_tmpfs
):
    disk = small_tmpfs("12m")  # room for about one checkpoint of ts-1m (vocab 400) with Adam
    wd = disk / "wd"
    r = subprocess.run(_cmd(wd, demo_data["translated"], 12, "--checkpoint-every", "2",
                            "--set", "checkpoint.keep=10"), env=ENV, capture_output=True,
                       text=True, timeout=600)  # fmt: skip
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr[-3000:]
    # one message, the last line; what TensorStore's threads print on their own is theirs, but
    # no exception escapes through jaxlm's code
    assert all("/jaxlm/" not in tb for tb in r.stderr.split("Traceback")[1:])
    assert err[-1].startswith("jaxlm train: error: ") and "No space left on device" in err[-1]
    model, info = load_model(wd)  # the last good checkpoint is whole and loads
    assert info.step is not None and info.step >= 2
    assert f"the last good checkpoint is step {info.step} in " in err[-1], err[-1]


def test_an_sae_rerun_with_another_layer_or_architecture_is_refused(tmp_path, demo_data, capsys):
    """A rerun into an SAE's directory with another layer or architecture used to say "resumed"
    and relabel the weights; it is refused in one line and nothing on disk changes."""
    m, out = tmp_path / "m", tmp_path / "sae"
    assert main(["init", "--preset", "ts-1m", "--vocab-size", "400", "--tokenizer",
                 str(demo_data["tok"]), "--out", str(m)]) == 0  # fmt: skip
    base = ["sae", "train", "--model", str(m), "--data", str(demo_data["translated"]), "--config",
            "configs/sae/tiny.yaml", "--training-tokens", "512", "--set", "log.progress=false",
            "--set", "log.plot=false", "--out", str(out)]  # fmt: skip
    assert main([*base, "--layer", "7"]) == 0
    before = _tree_hash(out)
    capsys.readouterr()
    for flags, what in ((["--layer", "3"], "layers"),
                        (["--layer", "7", "--architecture", "topk"], "sae.architecture"),
                        (["--layer", "7", "--set", "seed=1"], "seed")):  # fmt: skip
        assert main([*base, *flags]) == 2, flags
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "was made with other settings" in err[0] and what in err[0], err
        assert _tree_hash(out) == before, flags
    assert main([*base, "--layer", "7"]) == 0  # the same settings: done, nothing changed
    assert main([*base, "--layer", "3", "--overwrite"]) == 0
    assert json.loads((out / "cfg.json").read_text())["jaxlm"]["layer"] == 3
