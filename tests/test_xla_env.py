"""jaxlm.xla_env: the entry points' default XLA flags, and that a user's own setting wins."""

import os

from jaxlm import cli, xla_env


def test_defaults_are_added_once_and_a_users_flag_wins():
    env = {}
    assert xla_env.apply_defaults(env) == "--xla_gpu_enable_triton_gemm=false"
    assert xla_env.apply_defaults(env) == "--xla_gpu_enable_triton_gemm=false"  # idempotent
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=true"}
    assert xla_env.apply_defaults(env) == "--xla_dump_to=/tmp/x --xla_gpu_enable_triton_gemm=true"
    env = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
    assert xla_env.apply_defaults(env).split() == ["--xla_dump_to=/tmp/x", *xla_env.DEFAULTS]


def test_the_cli_sets_them_before_running_a_command(monkeypatch, capsys):
    monkeypatch.setenv("XLA_FLAGS", "")  # restored after the test, whatever the CLI sets
    monkeypatch.delenv("XLA_FLAGS")
    assert cli.main(["generate", "--checkpoint", "/nonexistent/run", "--prompt", "x"]) == 2
    assert "/nonexistent/run" in capsys.readouterr().err
    assert os.environ["XLA_FLAGS"].split() == list(xla_env.DEFAULTS)
