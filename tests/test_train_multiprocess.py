"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 4 fake devices each, train
exactly the steps that one process with 8 devices trains: the multi-host path of a TPU pod."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from jaxlm.cli import main
from jaxlm.train.metrics_log import read_metrics

ARGS = ["--steps", "6", "--batch-size", "8", "--preset", "ts-1m", "--checkpoint-every", "3",
        "--set", "log.every=1", "--set", "log.progress=false", "--set", "log.tensorboard=false",
        "--set", "log.plot=false", "--set", "eval.batches=1",
        "--set", "mesh.shape=[1,-1,1]"]  # fmt: skip


def _env(devices: int, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def _losses(workdir) -> np.ndarray:
    rows = [r for r in read_metrics(workdir / "metrics.jsonl") if "data_crc" in r]
    return np.array([r["loss"] for r in rows])


def _hosts(cmd: list[str], devices: int, **popen) -> list[subprocess.Popen]:
    port = portpicker.pick_unused_port()
    env = dict(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES="2")
    return [
        subprocess.Popen(cmd, env=_env(devices, **env, JAXLM_PROCESS_ID=str(i)), text=True, **popen)
        for i in range(2)
    ]


@pytest.mark.slow
def test_two_hosts_of_four_devices_equal_one_host_of_eight(tmp_path, demo_data):
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "--data", str(demo_data["translated"])]
    single = tmp_path / "single"  # in this process: conftest gives it 8 CPU devices
    assert main([*cmd[3:], "--workdir", str(single), *ARGS]) == 0

    multi = tmp_path / "multi"
    procs = _hosts([*cmd, "--workdir", str(multi), *ARGS], 4, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)  # fmt: skip
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    one, two = _losses(single), _losses(multi)
    assert len(one) == len(two) == 6
    np.testing.assert_allclose(two, one, atol=1e-5, rtol=0)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [
        "3",
        "6",
    ]


def test_sigterm_to_one_host_saves_on_both_and_exits(tmp_path, demo_data):
    """A preemption notice reaches one host first: both must save the same step and exit, not
    wait for each other in the checkpoint barrier and the next step's collectives."""
    wd = tmp_path / "wd"
    args = [*ARGS, "--steps", "2000", "--checkpoint-every", "1000"]
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "--data", str(demo_data["translated"])]
    procs = _hosts([*cmd, "--workdir", str(wd), *args], 2, stdout=subprocess.PIPE,
                   stderr=subprocess.PIPE)  # fmt: skip
    deadline, metrics = time.time() + 300, wd / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and len(_losses(wd)) >= 3):
        time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 75, err[-3000:]  # saved, not finished
    assert json.loads(outs[0][0].strip().splitlines()[-1])["preempted"] is True
    saved = [int(p.name) for p in (wd / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 3 <= saved[0] < 1000
