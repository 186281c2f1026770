"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives), 4 fake devices each, train
exactly the steps that one process with 8 devices trains: the multi-host path of a TPU pod."""

import os
import subprocess
import sys

import numpy as np
import portpicker

from jaxlm.metrics_log import read_metrics

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


def test_two_hosts_of_four_devices_equal_one_host_of_eight(tmp_path, demo_data):
    cmd = [sys.executable, "-m", "jaxlm.cli", "train", "--data", str(demo_data["translated"])]
    single = tmp_path / "single"
    subprocess.run([*cmd, "--workdir", str(single), *ARGS], env=_env(8), check=True, timeout=600)

    multi = tmp_path / "multi"
    port = portpicker.pick_unused_port()
    procs = [
        subprocess.Popen(
            [*cmd, "--workdir", str(multi), *ARGS],
            env=_env(
                4,
                JAXLM_COORDINATOR=f"127.0.0.1:{port}",
                JAXLM_NUM_PROCESSES="2",
                JAXLM_PROCESS_ID=str(i),
            ),  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
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
