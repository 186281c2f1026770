"""Test set-up: 8 fake CPU devices, set before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the training runs they start as subprocesses) compile the same tiny programs:
# a persistent compilation cache shared by the xdist workers and subprocesses compiles each once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", f"/tmp/jaxlm-test-xla-cache-{os.getuid()}")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real text in ../shared/data: skipped when absent, a failure under CI."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(
                f"CI=true but {SHARED_DATA} is missing: the shared data must sit beside the repo"
            )
        pytest.skip(f"{SHARED_DATA} not found (real-data tests skipped)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict:
    """A tiny prepared corpus from the built-in generator: translated-style and native-style."""
    from jaxlm.cli import main

    d = tmp_path_factory.mktemp("demo_data")
    for style, n in (("translated", 1500), ("native", 300)):
        main(["data", "demo-corpus", "--style", style, "--n", str(n), "--seed", "0",
              "--out", str(d / f"{style}.jsonl")])  # fmt: skip
    main(["tokenizer", "train", "--input", str(d / "translated.jsonl"), "--input",
          str(d / "native.jsonl"), "--vocab-size", "400", "--out", str(d / "tok")])  # fmt: skip
    for style in ("translated", "native"):
        main(["data", "prepare", "--input", str(d / f"{style}.jsonl"), "--tokenizer",
              str(d / "tok"), "--seq-len", "32", "--out", str(d / f"data_{style}")])  # fmt: skip
    return {
        "dir": d,
        "tok": d / "tok",
        "translated": d / "data_translated",
        "native": d / "data_native",
    }


def pytest_collection_modifyitems(config, items):
    """Modules holding a `slow` test run first, each kept whole (its module fixtures are built
    once): with xdist, a long test that starts last leaves the other worker idle at the end.
    Needs `--dist worksteal` (make test): plain `load` hands each worker a contiguous first
    chunk, so one worker got every slow module and the other sat idle for minutes."""
    slow = {item.module for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: item.module not in slow)  # stable: order kept within each group


# Under CI every optional dependency is installed (make test), so a skip can only mean a wrong
# path or a broken install hiding tests: it is reported as a failure, with the skip's reason.
# The one exception is a skip whose reason starts with "environment:": what the machine itself
# does not permit (mounting a tmpfs, running a command as another user), which no install fixes.
_CI = os.environ.get("CI", "").lower() == "true"


def _skip_fails_under_ci(report) -> None:
    if _CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else report.longrepr
        if str(reason).removeprefix("Skipped: ").startswith("environment:"):
            return
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _skip_fails_under_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _skip_fails_under_ci(outcome.get_result())


@pytest.fixture
def small_tmpfs(tmp_path):
    """A mounted tmpfs factory: small(size, readonly=False) -> its path; unmounted at the end.
    Full-disk and read-only cases need a real file system: as root, chmod does not stop writes."""
    import subprocess

    mounts = []

    def small(size: str = "1m", readonly: bool = False) -> Path:
        d = tmp_path / f"tmpfs{len(mounts)}"
        d.mkdir()
        opts = f"size={size}" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)  # fmt: skip
        if r.returncode != 0:
            pytest.skip(f"environment: cannot mount a tmpfs here ({r.stderr.strip()[:80]})")
        mounts.append(d)
        return d

    yield small
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)
