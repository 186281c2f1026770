"""tpu/ scripts in --dry-run: every printed line must be a gcloud command gcloud would accept.

The command table (tests/helpers_gcloud.py) is written from the gcloud reference pages (compute
tpus tpu-vm, compute tpus queued-resources, storage), not from tpu/gcloud.py, so the two check
each other.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from helpers_gcloud import parse_gcloud  # noqa: E402

from tpu import babysit, create, delete, gcloud, run, setup  # noqa: E402


def dry_run(script, argv: list[str], capsys) -> list[tuple[tuple[str, ...], list[str], dict]]:
    cut = argv.index("--") if "--" in argv else len(argv)  # the remote command stays last
    assert script.main([*argv[:cut], "--dry-run", *argv[cut:]]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines and all(line.startswith("gcloud ") for line in lines), out
    return [parse_gcloud(line) for line in lines]


def verbs(cmds) -> list[str]:
    return [f"{p[-2]} {p[-1]}" for p, _, _ in cmds]


def assert_bash_syntax(script: str) -> None:
    """The remote one-line script parses as bash (and fits on one printed line)."""
    assert "\n" not in script
    subprocess.run(["bash", "-n", "-c", script], check=True)


TPU = ["jaxlm-v5e", "--zone", "us-west4-a", "--project", "my-proj"]
REPO = ["--repo", "https://github.com/org/jaxlm.git", "--commit", "0123abc"]


def test_create_checks_describe_first_then_creates_a_spot_vm(capsys):
    cmds = dry_run(create, [*TPU, "--accelerator-type", "v5e-8", "--spot"], capsys)
    assert verbs(cmds) == ["tpu-vm describe", "tpu-vm create", "tpu-vm describe"]
    path, pos, flags = cmds[1]
    assert pos == ["jaxlm-v5e"] and flags["--accelerator-type"] == "v5litepod-8"
    assert flags["--version"] == "v2-alpha-tpuv5-lite" and "--spot" in flags
    assert flags["--project"] == "my-proj" and flags["--zone"] == "us-west4-a"


def test_create_is_idempotent(capsys):
    cmds = dry_run(create, [*TPU, "--simulate-state", "READY"], capsys)
    assert verbs(cmds) == ["tpu-vm describe"]


def test_create_queued_resource_reserved_replaces_a_suspended_one(capsys):
    argv = [*TPU, "--queued", "--reserved", "--accelerator-type", "v5p-128"]
    cmds = dry_run(create, [*argv, "--simulate-state", "SUSPENDED"], capsys)
    assert verbs(cmds) == [
        "queued-resources describe",
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",
    ]
    _, _, flags = cmds[2]
    assert flags["--node-id"] == "jaxlm-v5e" and "--reserved" in flags
    assert flags["--runtime-version"] == "v2-alpha-tpuv5" and "--force" in cmds[1][2]


@pytest.mark.parametrize(
    "accel,gcloud_name,version,hosts",
    [
        ("v4-8", "v4-8", "tpu-ubuntu2204-base", 1),
        ("v4-32", "v4-32", "tpu-ubuntu2204-base", 4),
        ("v5e-8", "v5litepod-8", "v2-alpha-tpuv5-lite", 1),
        ("v5litepod-16", "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
        ("v5e-256", "v5litepod-256", "v2-alpha-tpuv5-lite", 64),
        ("v5p-8", "v5p-8", "v2-alpha-tpuv5", 1),
        ("v6e-8", "v6e-8", "v2-alpha-tpuv6e", 1),
    ],
)
def test_runtime_version_and_hosts_per_generation(accel, gcloud_name, version, hosts, capsys):
    _, _, flags = dry_run(create, [*TPU, "--accelerator-type", accel], capsys)[1]
    assert flags["--accelerator-type"] == gcloud_name and flags["--version"] == version
    assert gcloud.hosts_of(accel) == hosts


@pytest.mark.parametrize("accel", ["v3-8", "v5e-3", "v4-12", "v6e", "tpu-8"])
def test_unknown_accelerator_type_fails_in_one_line(accel, capsys):
    assert create.main([*TPU, "--accelerator-type", accel, "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "unknown accelerator type" in err


def test_spot_and_reserved_are_mutually_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        create.main([*TPU, "--spot", "--reserved", "--dry-run"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err
    with pytest.raises(gcloud.GcloudError, match="mutually exclusive"):
        gcloud.Tpu("x", "us-west4-a", spot=True, reserved=True)


def test_simulate_state_needs_dry_run(capsys):
    assert delete.main([*TPU, "--simulate-state", "READY"]) == 2
    assert "--dry-run" in capsys.readouterr().err


@pytest.mark.parametrize("mode,expect", [("copy", "gcloud storage rsync --recursive"),
                                         ("gcsfuse", "gcsfuse -o ro --implicit-dirs")])  # fmt: skip
def test_setup_installs_the_commit_with_jax_tpu_on_all_workers(mode, expect, capsys):
    data = ["--data", "gs://bkt/data/ar-ts", "--data-mode", mode, "--data-dir", "/tmp/d"]
    cmds = dry_run(setup, [*TPU, *REPO, *data], capsys)
    assert verbs(cmds) == ["tpu-vm describe", "tpu-vm ssh"]
    flags = cmds[1][2]
    script = flags["--command"]
    assert flags["--worker"] == "all"
    assert "checkout --quiet --force 0123abc" in script and "'.[tpu]'" in script
    assert "git clone --quiet https://github.com/org/jaxlm.git" in script
    assert expect in script and "/tmp/d" in script
    assert_bash_syntax(script)


def test_setup_refuses_a_missing_slice(capsys):
    assert setup.main([*TPU, *REPO, "--dry-run", "--simulate-state", "MISSING"]) == 2
    assert "create it first" in capsys.readouterr().err


def test_run_exports_env_and_uploads_logs_to_gs(capsys):
    argv = [*TPU, "--env", "XLA_FLAGS=--xla_dump_to=/tmp/x y", "--log-dir", "gs://bkt/logs"]
    argv += ["--run-id", "r1", "--dry-run", "--", "jaxlm", "train", "--config", "c.yaml"]
    assert run.main(argv) == 0
    cmds = [parse_gcloud(line) for line in capsys.readouterr().out.splitlines()]
    assert verbs(cmds) == ["tpu-vm describe", "tpu-vm ssh"]
    script = cmds[1][2]["--command"]
    assert "export XLA_FLAGS='--xla_dump_to=/tmp/x y'" in script
    assert "( jaxlm train --config c.yaml ) 2>&1 | tee" in script
    assert "gcloud storage cp" in script and "gs://bkt/logs/r1/" in script
    parse_gcloud(script[script.index("gcloud storage cp") :].split(" || ")[0])
    assert_bash_syntax(script)


def test_run_to_a_local_log_dir_copies_logs_back_with_scp(tmp_path, capsys):
    argv = [*TPU, "--log-dir", str(tmp_path / "logs"), "--run-id", "r2", "--", "echo", "hi"]
    cmds = dry_run(run, argv, capsys)
    assert verbs(cmds) == ["tpu-vm describe", "tpu-vm ssh", "tpu-vm scp"]
    assert cmds[2][1] == ["jaxlm-v5e:~/jaxlm-logs/r2", str(tmp_path / "logs")]
    assert not (tmp_path / "logs").exists()  # a dry run touches nothing


def test_run_without_a_command_fails_in_one_line(capsys):
    assert run.main([*TPU, "--dry-run"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_babysit_recreates_sets_up_and_reruns_after_preemption(capsys):
    argv = [*TPU, *REPO, "--spot", "--log-dir", "gs://bkt/logs", "--run-id", "r1"]
    argv += ["--simulate-state", "READY", "--simulate-state", "PREEMPTED", "--"]
    argv += ["jaxlm", "train", "--workdir", "gs://bkt/runs/ts-33m"]
    cmds = dry_run(babysit, argv, capsys)
    assert verbs(cmds) == [
        "tpu-vm describe",  # READY: set up and run
        "tpu-vm ssh",
        "tpu-vm ssh",
        "tpu-vm describe",  # the run failed and the slice is PREEMPTED
        "tpu-vm delete",
        "tpu-vm create",
        "tpu-vm describe",  # READY again
        "tpu-vm ssh",
        "tpu-vm ssh",
    ]
    setup1, run1, setup2, run2 = (cmds[i][2]["--command"] for i in (1, 2, 7, 8))
    assert setup1 == setup2 and "--force 0123abc" in setup1
    assert run1 == run2 and "--workdir gs://bkt/runs/ts-33m" in run1  # the same command resumes
    assert "--spot" in cmds[5][2]


def test_babysit_queued_resource_suspended_at_start(capsys):
    argv = [*TPU, *REPO, "--queued", "--spot", "--simulate-state", "SUSPENDED", "--", "true"]
    assert verbs(dry_run(babysit, argv, capsys)) == [
        "queued-resources describe",
        "queued-resources delete",
        "queued-resources create",
        "queued-resources describe",
        "tpu-vm ssh",
        "tpu-vm ssh",
        "tpu-vm scp",
    ]


@pytest.mark.parametrize("queued", [False, True])
def test_delete_is_quiet_and_skips_a_missing_slice(queued, capsys):
    q = ["--queued"] if queued else []
    cmds = dry_run(delete, [*TPU, *q], capsys)
    assert verbs(cmds)[-1].endswith("delete") and "--quiet" in cmds[-1][2]
    assert verbs(dry_run(delete, [*TPU, *q, "--simulate-state", "MISSING"], capsys)) == [
        verbs(cmds)[0]
    ]


def test_scripts_run_as_files():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tpu" / "delete.py"), *TPU, "--dry-run"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert [parse_gcloud(line)[0][-1] for line in out.splitlines()] == ["describe", "delete"]
