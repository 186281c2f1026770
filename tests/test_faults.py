"""Fault suite: every command that writes owns its output (`jaxlm.outputs.Output`).

For each writing command (the two trainers are tested with their own code): a second writer is
refused naming the first; a rerun with an identity-defining setting changed is refused in one line
and changes nothing on disk (hashed before and after), while the same settings find the output
done; a read-only and a full output (small tmpfs mounts) are one line, exit 2, with nothing left
behind; a run killed with SIGKILL at a random point leaves leftovers that the rerun cleans, and
the rerun's output equals an uninterrupted run's; corrupt inputs (an ArrayRecord shard, a
safetensors file, metadata files, a tokenizer model, an HF config) and files where folders are
expected (and the reverse) are one line, exit 2. And the issue's must-shows: a tokenizer that a
model records cannot be retrained in place, `init` cannot replace a training workdir, and a
tokenizer changed under a model is refused by every consumer.

Commands run in this process (`jaxlm.cli.main`), the killed ones in a subprocess; the lock of a
"concurrent writer" is held by this process, so the refusal names this pid.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxlm.cli import main
from jaxlm.outputs import Lock, Output, differences

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-test-faults"


# --- helpers ------------------------------------------------------------------------------------


def cli(*argv) -> tuple[int, str]:
    """(exit code, stderr) of `jaxlm ARGV` run in this process."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([str(a) for a in argv])
    return rc, err.getvalue()


def ok(*argv) -> str:
    rc, err = cli(*argv)
    assert rc == 0, err
    return err


def refused(*argv) -> str:
    """The one error line of a run that must exit 2 without a traceback."""
    rc, err = cli(*argv)
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if " error: " in x]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def digest(path: Path) -> str:
    """A hash of an output as it is on disk: a folder's files, or a file and its identity (not
    its lock, which names the last holder); a missing output hashes as missing."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file())
    else:
        files = [f for f in (path, path.with_name(path.name + ".identity.json")) if f.exists()]
    h = hashlib.sha256(b"missing" if not path.exists() else b"")
    for f in files:
        h.update(str(f.relative_to(path.parent)).encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def leftovers(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f".{path.name}.tmp-*")) + sorted(
        path.parent.glob(f".{path.name}.old-*")
    )


@contextlib.contextmanager
def tmpfs(where: Path, *opts: str):
    """A 256 KiB tmpfs at `where` (`ro` in opts: read-only), unmounted at the end."""
    where.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", ",".join(["size=256k", *opts]), "tmpfs", str(where)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"environment: cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


# --- the world: small inputs every case reads ---------------------------------------------------


class World:
    """Inputs in one folder: a corpus, a tokenizer, a DATADIR, a tiny model and its HF export, an
    SAE on its MLP, translation parts, judge inputs, and a fake LLM server."""

    def __init__(self, d: Path):
        from jaxlm.checkpoint import save_model
        from jaxlm.model import init_model

        self.d = d
        self.corpus = d / "corpus.jsonl"
        ok("data", "demo-corpus", "--style", "translated", "--n", "150", "--out", self.corpus)
        self.tok = d / "tok"
        ok("tokenizer", "train", "--input", self.corpus, "--vocab-size", "400", "--out", self.tok)
        self.data = d / "data"
        ok("data", "prepare", "--input", self.corpus, "--tokenizer", self.tok, "--seq-len", "16",
           "--workers", "1", "--val-fraction", "0.1", "--out", self.data)  # fmt: skip
        cfg = tiny_config(self.tok)
        self.model = save_model(d / "model", init_model(cfg, 0), tokenizer=str(self.tok))
        self.model2 = save_model(d / "model2", init_model(cfg, 1), tokenizer=str(self.tok))
        self.hf = d / "hf"
        ok("export-hf", "--checkpoint", self.model, "--out", self.hf)
        self.hf2 = d / "hf2"
        shutil.copytree(self.hf, self.hf2)
        self.sae = d / "sae"
        _save_sae(self.sae, d_in=64, d_sae=8, layer=1)
        self.parts = [d / "part0.jsonl", d / "part1.jsonl"]
        for i, p in enumerate(self.parts):
            p.write_text("".join(json.dumps({"id": f"s{i}{j}", "source": "x", "text": "ي"}) + "\n"
                                 for j in range(3)))  # fmt: skip
        # translation runs here have nothing to translate (the model is never loaded: real
        # translation, kill and resume are test_translate.py's); the output's handling is the same
        self.en = d / "en.txt"
        self.en.write_text("")
        self.judge_inputs = d / "judge_inputs.jsonl"
        self.judge_inputs.write_text(
            json.dumps({"id": "a", "prompt": "كان", "completion": "ولد", "checkpoint": "m"}) + "\n"
        )
        self.server_url = ""  # set by the fixture while its server runs
        self.made: dict[str, Path] = {}  # case -> its output, made once with the base settings


def tiny_config(tok: Path):
    """A two-layer model for `tok` (its vocabulary exactly, as the SAE commands want), with room
    for a story's beginning and a few new tokens."""
    from jaxlm.config import ModelConfig
    from jaxlm.tokenizer import Tokenizer

    V = Tokenizer.load(tok).vocab_size
    return ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_mlp=64, max_positions=512)


def _save_sae(path: Path, d_in: int, d_sae: int, layer: int) -> None:
    from sae.base import SAEConfig
    from sae.io import save_sae
    from sae.registry import create

    rng = np.random.default_rng(0)
    W = rng.normal(size=(d_in, d_sae)).astype(np.float32)
    sae = create(SAEConfig(architecture="standard", d_in=d_in, d_sae=d_sae))
    sae.load_tensors({"W_enc": W, "b_enc": np.full(d_sae, -0.3, np.float32), "W_dec": W.T.copy(),
                      "b_dec": np.zeros(d_in, np.float32)})  # fmt: skip
    save_sae(path, sae, layer=layer)


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    from helpers_llm_server import FakeLLMServer

    world = World(tmp_path_factory.mktemp("faults"))
    with FakeLLMServer() as srv:
        world.server_url = srv.url + "/v1"
        yield world


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


# --- the writing commands: base arguments (OUT is the output) and identity-defining changes -----

OUT = "{OUT}"
SETS = ["--regex", "alef=^ا"]  # a token set the tiny tokenizer surely has
FAST_MT = ["--len-ratio", "0.3", "--len-extra", "4", "--filters", "none"]

CASES: dict[str, dict] = {
    "demo-corpus": {
        "argv": lambda w: ["data", "demo-corpus", "--style", "native", "--n", "300", "--out", OUT],
        "changes": [
            (["--n", "301"], "n"),
            (["--seed", "1"], "seed"),
            (["--style", "translated"], "style"),
        ],  # fmt: skip
    },
    "tokenizer-train": {
        "argv": lambda w: [
            "tokenizer",
            "train",
            "--input",
            w.corpus,
            "--vocab-size",
            "400",
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [
            (["--vocab-size", "410"], "vocab_size"),
            (["--seed", "1"], "seed"),
            (["--sample-size", "50"], "sample_size"),
            (["--min-chars", "5"], "cleaning.min_chars"),
            (["--remove-diacritics"], "cleaning.remove_diacritics"),
        ],  # fmt: skip
    },
    "data-prepare": {
        "argv": lambda w: [
            "data",
            "prepare",
            "--input",
            w.corpus,
            "--tokenizer",
            w.tok,
            "--seq-len",
            "16",
            "--workers",
            "1",
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [
            (["--seq-len", "17"], "seq_len"),
            (["--val-fraction", "0.5"], "val_fraction"),
            (["--rows-per-shard", "100"], "rows_per_shard"),
            (["--no-dedup"], "cleaning.dedup"),
        ],  # fmt: skip
    },
    "init": {
        "argv": lambda w: [
            "init",
            "--preset",
            "ts-1m",
            "--vocab-size",
            "400",
            "--tokenizer",
            w.tok,
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [
            (["--seed", "1"], "seed"),
            (["--vocab-size", "410"], "vocab_size"),
            (["--preset", "ts-3m"], "preset"),
        ],  # fmt: skip
    },
    "import-hf": {
        "argv": lambda w: ["import-hf", "--hf", w.hf, "--out", OUT],
        "dir": True,
        "changes": [(["--hf", "{hf2}"], "files")],
    },
    "export-hf": {
        "argv": lambda w: ["export-hf", "--checkpoint", w.model, "--out", OUT],
        "dir": True,
        "changes": [(["--checkpoint", "{model2}"], "model.path")],
    },
    "judge-complete": {
        "argv": lambda w: [
            "judge",
            "complete",
            "--checkpoint",
            w.model,
            "--stories",
            w.corpus,
            "--n",
            "8",
            "--max-new-tokens",
            "4",
            "--batch-size",
            "8",
            "--out",
            OUT,
        ],  # fmt: skip
        "changes": [
            (["--n", "3"], "n"),
            (["--seed", "1"], "seed"),
            (["--temperature", "0.5"], "temperature"),
            (["--top-k", "5"], "top_k"),
            (["--fraction", "0.5"], "fraction"),
            (["--checkpoint", "{model2}"], "model.path"),
        ],  # fmt: skip
    },
    "translate-merge": {
        "argv": lambda w: ["translate-merge", *w.parts, "--out", OUT],
        "changes": [(["--id-field", "key"], "id_field")],
    },
    "eval-artifacts": {
        "argv": lambda w: [
            "eval",
            "artifacts",
            "--stories",
            w.corpus,
            "--resamples",
            "10",
            "--out",
            OUT,
        ],  # fmt: skip
        "changes": [(["--resamples", "20"], "resamples"), (["--seed", "1"], "seed")],
    },
    "sae-tsea": {
        "argv": lambda w: [
            "sae",
            "tsea",
            "--model",
            w.model,
            "--sae",
            w.sae,
            *SETS,
            "--null-directions",
            "0",
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [
            (["--alpha", "0.1"], "alpha"),
            (["--layer", "0"], "layer"),
            (["--model", "{model2}"], "model.path"),
        ],  # fmt: skip
    },
    "sae-tsea-compare": {
        "argv": lambda w: [
            "sae",
            "tsea-compare",
            "--before",
            w.model,
            w.sae,
            "--after",
            w.model2,
            w.sae,
            *SETS,
            "--null-directions",
            "0",
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [(["--top", "3"], "top")],
    },
    "sae-dashboard": {
        "argv": lambda w: [
            "sae",
            "dashboard",
            "--model",
            w.model,
            "--sae",
            w.sae,
            "--data",
            w.data,
            "--features",
            "0-3",
            "--rows",
            "8",
            "--out",
            OUT,
        ],  # fmt: skip
        "dir": True,
        "changes": [(["--features", "0-2"], "features"), (["--k", "3"], "k")],
    },
    "synthesize": {
        "argv": lambda w: [
            "synthesize",
            "--n",
            "2",
            "--provider",
            "openai",
            "--model",
            "fake",
            "--base-url",
            w.server_url,
            "--concurrency",
            "2",
            "--out",
            OUT,
        ],  # fmt: skip
        "resume": True,
        "changes": [
            (["--seed", "1"], "seed"),
            (["--temperature", "0.5"], "temperature"),
            (["--max-tokens", "100"], "max_tokens"),
            (["--near-dup", "0.5"], "near_dup"),
            (["--min-words", "10"], "checks.min_words"),
        ],  # fmt: skip
    },
    "translate": {
        "argv": lambda w: [
            "translate",
            "--input",
            w.en,
            "--model",
            "tiny-nllb",
            *FAST_MT,
            "--out",
            OUT,
        ],  # fmt: skip
        "resume": True,
        "changes": [
            (["--beam", "2"], "beam"),
            (["--tgt", "fra_Latn"], "tgt"),
            (["--len-extra", "5"], "len_extra"),
            (["--no-fix-text"], "fix_text"),
            (["--filters", "wrong_script"], "filters.enabled"),
        ],  # fmt: skip
    },
    "judge-grade": {  # keyed by its records (its own tests); here only the lock
        "argv": lambda w: [
            "judge",
            "grade",
            "--inputs",
            w.judge_inputs,
            "--provider",
            "openai",
            "--model",
            "fake",
            "--base-url",
            w.server_url,
            "--out",
            OUT,
        ],  # fmt: skip
        "resume": True,
    },
}


def argv(w: World, case: str, out: Path, extra: list[str] = ()) -> list:
    subs = {"{hf2}": w.hf2, "{model2}": w.model2}
    base = [out if a == OUT else a for a in CASES[case]["argv"](w)]
    return [*base, *(subs.get(a, a) for a in extra)]


def made(w: World, case: str) -> Path:
    """The case's output, made once with its base settings."""
    if case not in w.made:
        out = w.d / "made" / case
        ok(*argv(w, case, out))
        w.made[case] = out
    return w.made[case]


# --- a second writer ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_second_writer_is_refused_naming_the_first(w, case):
    out = w.d / "locked" / case
    with Lock(out):
        line = refused(*argv(w, case, out))
    assert f"{out} is being written by pid {os.getpid()}" in line, line
    assert not out.exists() and not leftovers(out)


def test_two_concurrent_prepares_one_refused_one_output(w):
    """The issue's case: two `jaxlm data prepare` on one --out, started together as processes:
    one is refused naming the other, whose output is whole."""
    out = w.d / "race"
    cmd = [sys.executable, "-m", "jaxlm.cli", *map(str, argv(w, "data-prepare", out))]
    cmd += ["--input", str(_big(w))]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              text=True) for _ in range(2)]  # fmt: skip
    codes = sorted((p.wait(), p) for p in procs)
    (won, winner), (lost, loser) = codes[0], codes[1]
    assert (won, lost) == (0, 2), [p.stderr.read() for p in procs]
    assert f"is being written by pid {winner.pid}" in loser.stderr.read()
    assert json.loads((out / "metadata.json").read_text())["stories"] > 0 and not leftovers(out)


def test_the_jsonl_store_and_merge_name_the_writer(w, tmp_path):
    """A JSON Lines file's own lock (a rejected file, any store) names its holder too, and a merge
    refuses a part that a translation worker is still writing."""
    from jaxlm.errors import UserError
    from jaxlm.store import JsonlStore

    path = tmp_path / "x.rejected.jsonl"
    with Lock(path), pytest.raises(UserError, match=f"being written by pid {os.getpid()}"):
        JsonlStore(path).open()
    with Lock(w.parts[1]):
        line = refused("translate-merge", *w.parts, "--out", tmp_path / "merged.jsonl")
    assert f"{w.parts[1]} is being written by pid {os.getpid()}" in line
    assert not (tmp_path / "merged.jsonl").exists()


def _big(w: World) -> Path:
    """A corpus that takes `data prepare` a few seconds."""
    big = w.d / "big.jsonl"
    if not big.exists():
        ok("data", "demo-corpus", "--style", "translated", "--n", "2000", "--out", big)
    return big


def _wait_for(cond, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.time() < deadline
        time.sleep(0.01)


# --- a rerun with other settings ----------------------------------------------------------------


IDENTITY_CASES = [(c, i) for c in sorted(CASES) for i in range(len(CASES[c].get("changes", [])))]


@pytest.mark.parametrize(("case", "change"), IDENTITY_CASES)
def test_other_settings_are_refused_and_change_nothing(w, case, change):
    out = made(w, case)
    before = digest(out)
    extra, key = CASES[case]["changes"][change]
    line = refused(*argv(w, case, out, extra))
    assert "made with other settings" in line and key in line and "--overwrite" in line, line
    assert digest(out) == before and not leftovers(out)


def test_the_changed_setting_comes_before_what_is_derived_from_it():
    """A one-line refusal lists four differences: the one a user changed (`model.path`) leads,
    not the model's file details that change with it (they once hid it when mtimes differed)."""
    old = {"model": {"path": "a", "params": {"bytes": 1, "files": 1, "mtime": 1, "path": "a/p"}}}
    new = {"model": {"path": "b", "params": {"bytes": 2, "files": 3, "mtime": 2, "path": "b/p"}}}
    diff = differences(old, new)
    assert diff[0] == 'model.path "a" -> "b"' and len(diff) == 5, diff


@pytest.mark.parametrize("case", [c for c in sorted(CASES) if "changes" in CASES[c]])
def test_the_same_settings_find_it_done(w, case):
    out = made(w, case)
    before = digest(out)
    err = ok(*argv(w, case, out))
    if not CASES[case].get("resume"):
        assert "already made with these settings" in err
    assert digest(out) == before


def test_overwrite_replaces_and_a_foreign_output_is_refused(w):
    out = w.d / "ow" / "corpus.jsonl"
    ok(*argv(w, "demo-corpus", out))
    ok(*argv(w, "demo-corpus", out, ["--n", "5", "--overwrite"]))
    assert len(out.read_text().splitlines()) == 5
    assert json.loads(out.with_name("corpus.jsonl.identity.json").read_text())["identity"]["n"] == 5
    foreign = w.d / "ow" / "notes.jsonl"
    foreign.write_text("mine\n")
    line = refused(*argv(w, "demo-corpus", foreign))
    assert "not made by `jaxlm`" in line and foreign.read_text() == "mine\n"
    line = refused(*argv(w, "data-prepare", out.parent / "corpus.jsonl.identity.json"))
    assert "exists and is not a folder" in line  # --out naming a file, for a folder output


def test_judge_complete_does_not_replace_completions_without_overwrite(w):
    """The issue's case: `judge complete --out` replaced a file that grades were made from."""
    out = made(w, "judge-complete")
    before = digest(out)
    line = refused(*argv(w, "judge-complete", out, ["--n", "2"]))
    assert "n 8 -> 2" in line and digest(out) == before


def test_synthesize_resume_with_another_seed_is_refused_and_the_first_recorded(w):
    """The issue's case: `synthesize` took another --seed on resume without recording the first."""
    out = made(w, "synthesize")
    saved = json.loads(out.with_name(out.name + ".identity.json").read_text())
    assert saved["identity"]["seed"] == 0 and saved["identity"]["prompts_sha256"]
    before = digest(out)
    line = refused(*argv(w, "synthesize", out, ["--seed", "7", "--n", "3"]))
    assert "seed 0 -> 7" in line and digest(out) == before
    ok(*argv(w, "synthesize", out, ["--n", "3"]))  # the same settings resume: one more story
    assert len(out.read_text().splitlines()) == 3


def test_translate_retry_rejected_may_change_settings_and_is_recorded(w):
    out = made(w, "translate")
    ok(*argv(w, "translate", out, ["--retry-rejected", "--beam", "2"]))
    saved = json.loads(out.with_name(out.name + ".identity.json").read_text())
    assert saved["identity"]["beam"] == 1 and saved["history"][-1]["retry_rejected"]["beam"] == 2


# --- killed runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["data-prepare", "tokenizer-train"])
def test_a_killed_run_is_cleaned_and_the_rerun_equals_an_uninterrupted_one(w, case):
    seed = random.randrange(1 << 30)
    print(f"kill seed {seed}")
    rng = random.Random(seed)
    big = _big(w)
    extra = ["--input", big] if case == "data-prepare" else ["--input", big, "--vocab-size", "450"]
    out = w.d / "killed" / case
    cmd = [sys.executable, "-m", "jaxlm.cli", *map(str, argv(w, case, out, extra))]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    _wait_for(lambda: leftovers(out), proc)
    time.sleep(rng.uniform(0, 0.5))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert leftovers(out) and not out.exists()  # killed half way: only its temporary sibling
    ok(*argv(w, case, out, extra))
    assert not leftovers(out)
    ref = w.d / "killed" / f"{case}-ref"
    ok(*argv(w, case, ref, extra))
    assert _contents(out) == _contents(ref)


def _contents(d: Path) -> dict[str, object]:
    """A folder's files, less what records when or where they were made."""
    out: dict[str, object] = {}
    for f in sorted(d.iterdir()):
        if f.name in ("identity.json", "metadata.json"):
            data = json.loads(f.read_text())
            for k in ("created", "seconds"):
                data.pop(k, None)
            for src in data.get("identity", {}).get("inputs", []):
                src.pop("mtime", None)
            out[f.name] = data
        else:
            out[f.name] = f.read_bytes()
    return out


# --- read-only, full, no permission -------------------------------------------------------------


@pytest.fixture(scope="module")
def readonly(tmp_path_factory):
    with tmpfs(tmp_path_factory.mktemp("ro") / "mnt", "ro") as d:
        yield d


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_read_only_output_is_one_line(w, readonly, case):
    out = readonly / case
    line = refused(*argv(w, case, out))
    assert str(out) in line and "Read-only file system" in line, line


# outputs bigger than what the full disk leaves them (the small ones get more stories)
FULL_CASES = {  # extra arguments; the output named in the error (default: OUT)
    "demo-corpus": [], "tokenizer-train": [], "data-prepare": [], "init": [], "import-hf": [],
    "export-hf": [], "judge-complete": ["--n", "40"],
    "eval-artifacts": ["--per-story", "{DIR}/per_story.jsonl"],  # names per_story.jsonl
    "synthesize": ["--n", "40"], "sae-tsea": [],
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(FULL_CASES))
def test_a_full_disk_is_one_line_and_leaves_nothing(w, tmp_path, case, caplog):
    with tmpfs(tmp_path / "mnt") as d:
        filler = d / "filler"
        free = os.statvfs(d).f_bavail * os.statvfs(d).f_frsize
        filler.write_bytes(b"\0" * (free - 12 * 1024))  # room for the checks and the lock only
        out = d / case
        extra = [a.replace("{DIR}", str(d)) for a in FULL_CASES[case]]
        line = refused(*argv(w, case, out, extra))
        named = d / "per_story.jsonl" if case == "eval-artifacts" else out
        assert f"{named}: cannot write (No space left on device)" in line, line
        traces = [r for r in caplog.records if r.name == "absl" and r.levelno >= logging.ERROR]
        assert not traces  # Orbax's logged tracebacks of the failed save are dropped
        assert not leftovers(out)
        if not CASES[case].get("resume"):
            assert not out.exists()


def test_no_permission_is_one_line():
    """Run as `nobody` (root here writes anywhere): a folder it may not write to."""
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("environment: no setpriv to run a command as another user")
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([*nobody, "-c", "import jaxlm.outputs"], env=env, cwd="/",
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"environment: python does not run as another user ({r.stderr[-200:]})")
    top = Path(tempfile.mkdtemp(prefix="jaxlm-perm-"))  # /tmp: others may enter, not write
    try:
        top.chmod(0o755)
        out = top / "sub" / "c.jsonl"
        cmd = [*nobody, "-m", "jaxlm.cli", "data", "demo-corpus", "--style", "native", "--n", "3",
               "--out", str(out)]  # fmt: skip
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd="/")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().splitlines() == [
            f"jaxlm data: error: {out}: cannot write there (Permission denied)"
        ]
        assert not any(top.iterdir())
    finally:
        shutil.rmtree(top)


# --- corrupt inputs and wrong kinds of paths ----------------------------------------------------


def _corrupt(w: World, tmp: Path, what: str) -> tuple[list, str]:
    """(argv, what the one line says) for a command reading a damaged copy of an input."""
    if what in ("shard-truncated", "shard-flipped"):
        data = tmp / "data"
        shutil.copytree(w.data, data)
        shard = sorted(data.glob("train-*.arrayrecord"))[0]
        raw = bytearray(shard.read_bytes())
        if what == "shard-truncated":
            raw = raw[:5000]
        else:
            for i in range(0, min(len(raw), 60000), 3):
                raw[i] ^= 0xFF
        shard.write_bytes(bytes(raw))
        argv_ = ["sae", "dashboard", "--model", w.model, "--sae", w.sae, "--data", data,
                 "--features", "0", "--rows", "8", "--out", tmp / "o"]  # fmt: skip
        return argv_, "shard" if what == "shard-truncated" else "a shard is corrupt"
    if what == "data-metadata":
        data = tmp / "data"
        shutil.copytree(w.data, data)
        (data / "metadata.json").write_text('{"tokenizer": ')
        return ["sae", "dashboard", "--model", w.model, "--sae", w.sae, "--data", data,
                "--features", "0", "--out", tmp / "o"], "metadata.json: cannot read"  # fmt: skip
    if what in ("safetensors", "hf-config"):
        hf = tmp / "hf"
        shutil.copytree(w.hf, hf)
        name = "model.safetensors" if what == "safetensors" else "config.json"
        (hf / name).write_bytes((hf / name).read_bytes()[:100])
        return ["import-hf", "--hf", hf, "--out", tmp / "o"], f"{name}: cannot read"
    if what == "model-metadata":
        m = tmp / "m"
        shutil.copytree(w.model, m)
        (m / "jaxlm_model.json").write_text('{"model": {"d_model": ')
        return ["generate", "--checkpoint", m, "--prompt-ids", "1"], "jaxlm_model.json: cannot read"
    if what == "spm-model":
        tok = tmp / "tok"
        shutil.copytree(w.tok, tok)
        (tok / "spm.model").write_bytes(b"\x0a\xff garbage")
        return ["data", "prepare", "--input", w.corpus, "--tokenizer", tok, "--seq-len", "8",
                "--out", tmp / "o"], "not a SentencePiece model"  # fmt: skip
    if what == "tokenizer-is-a-file":
        return ["data", "prepare", "--input", w.corpus, "--tokenizer", w.corpus, "--seq-len", "8",
                "--out", tmp / "o"], "not a SentencePiece model"  # fmt: skip
    if what == "checkpoint-is-a-file":
        return ["generate", "--checkpoint", w.corpus, "--prompt-ids", "1"], "a file, not a model"
    if what == "out-under-a-file":
        return argv(w, "demo-corpus", w.corpus / "x.jsonl"), "is a file, not a folder"
    if what == "file-out-is-a-folder":
        (tmp / "dir").mkdir()
        return argv(w, "demo-corpus", tmp / "dir"), "exists and is not a file"
    if what in ("judge-out-is-inputs", "judge-input-without-id"):  # fixed in judge: checked
        inputs = tmp / "in.jsonl"
        inputs.write_text(json.dumps({"id": "a", "prompt": "p", "completion": "c"}) + "\n")
        out = inputs if what == "judge-out-is-inputs" else tmp / "grades.jsonl"
        if what == "judge-input-without-id":
            inputs.write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
        says = "is the inputs file" if out == inputs else "in.jsonl:1: missing field 'id'"
        return ["judge", "grade", "--inputs", inputs, "--provider", "openai", "--model", "fake",
                "--base-url", w.server_url, "--out", out], says  # fmt: skip
    assert what == "overwrite-onto-a-file"
    return [*argv(w, "data-prepare", w.corpus), "--overwrite"], "exists and is not a folder"


CORRUPT = ["shard-truncated", "shard-flipped", "data-metadata", "safetensors", "hf-config",
           "model-metadata", "spm-model", "tokenizer-is-a-file", "checkpoint-is-a-file",
           "out-under-a-file", "file-out-is-a-folder", "overwrite-onto-a-file",
           "judge-out-is-inputs", "judge-input-without-id"]  # fmt: skip


@pytest.mark.parametrize("what", CORRUPT)
def test_a_corrupt_input_or_wrong_path_is_one_line(w, tmp_path, what):
    before = digest(w.corpus)
    argv_, says = _corrupt(w, tmp_path, what)
    line = refused(*argv_)
    assert says in line, line
    assert digest(w.corpus) == before  # nothing written over an input


# --- the must-shows ---------------------------------------------------------------------


def test_a_tokenizer_a_model_records_is_not_retrained_in_place(w, tmp_path):
    from jaxlm.checkpoint import save_model
    from jaxlm.model import init_model

    tok = tmp_path / "tok"
    base = ["tokenizer", "train", "--input", w.corpus, "--vocab-size", "400", "--out", tok]
    ok(*base)
    cfg = tiny_config(tok)
    m = save_model(tmp_path / "m", init_model(cfg, 0), tokenizer=str(tok))
    gen = ["generate", "--checkpoint", m, "--prompt", "كان", "--max-new-tokens", "2", "--greedy"]
    ok(*gen)
    before = digest(tok)
    line = refused(*base[:-4], "--vocab-size", "450", "--out", tok)
    assert line.endswith(
        f"{tok} was made with other settings (vocab_size 400 -> 450): rerun with those settings "
        "to keep it, or pass --overwrite to replace it, or choose another --out"
    ), line
    assert digest(tok) == before
    ok(*gen)  # the model still reads its own tokenizer
    # replaced on purpose: every consumer of the model now refuses it in one line
    ok(*base[:-4], "--vocab-size", "450", "--out", tok, "--overwrite")
    changed = "this tokenizer changed since"
    assert changed in refused(*gen)
    assert changed in refused("export-hf", "--checkpoint", m, "--out", tmp_path / "hf")
    assert changed in refused("judge", "complete", "--checkpoint", m, "--stories", w.corpus,
                              "--n", "1", "--out", tmp_path / "c.jsonl")  # fmt: skip
    assert changed in refused("eval", "artifacts", "--checkpoint", m, "--n", "1",
                              "--out", tmp_path / "a.json")  # fmt: skip
    assert changed in refused("sae", "tsea", "--model", m, "--sae", w.sae, *SETS,
                              "--out", tmp_path / "t")  # fmt: skip
    ok(*gen, "--tokenizer", w.tok)  # the same training elsewhere: the model's own, by content
    other = shutil.copytree(tok, tmp_path / "other")  # the new one, passed by another path
    assert f"--tokenizer {other} is not the tokenizer {m}" in refused(*gen, "--tokenizer", other)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "c.jsonl").exists()


@pytest.mark.parametrize("trainer_identity", [False, True])
def test_init_into_a_training_workdir_is_refused(w, tmp_path, trainer_identity):
    """A training workdir (the metadata and checkpoints `jaxlm train` writes; with or without the
    identity its trainer records) is not replaced by `init`: generate still reads it after."""
    from jaxlm.checkpoint import Checkpoints, params_tree, write_meta
    from jaxlm.model import init_model

    wd = tmp_path / "workdir"
    cfg = tiny_config(w.tok)
    if trainer_identity:
        with Output(wd, kind="lm-train", identity={"model": cfg.to_dict()}, mode="resume"):
            pass
    write_meta(wd, cfg, str(w.tok), seq_len=16)
    ckpt = Checkpoints(wd / "checkpoints", trees=("params",), async_save=False)
    ckpt.save(3, {"params": params_tree(init_model(cfg, 0))}, data={}, meta={})
    ckpt.close()
    gen = ["generate", "--checkpoint", wd, "--prompt-ids", "3,5", "--max-new-tokens", "2"]
    ok(*gen)
    before = digest(wd)
    line = refused("init", "--preset", "ts-1m", "--vocab-size", "420", "--out", wd)
    want = "holds a lm-train output, not a model" if trainer_identity else "not made by `jaxlm`"
    assert str(wd) in line and want in line, line
    assert digest(wd) == before and not leftovers(wd)
    ok(*gen)


def test_the_late_errors_of_a_failed_saves_orphaned_writes_are_dropped_and_no_others():
    """After a failed save, its writes still in flight raise "Event loop is closed" through
    sys.unraisablehook, past the one-line error: dropped; any other unraisable error still shows."""
    code = (
        "import gc\n"
        "from jaxlm.checkpoint import ignore_orphaned_writes\n"
        "class Late:\n"
        "    def __init__(self, why): self.why = why\n"
        "    def __del__(self): raise RuntimeError(self.why)\n"
        "Late('Event loop is closed (before)'); gc.collect()\n"
        "ignore_orphaned_writes(); ignore_orphaned_writes()\n"
        "Late('Event loop is closed'); Late('something else'); gc.collect()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "RuntimeError: Event loop is closed (before)" in r.stderr  # the hook only once installed
    assert "RuntimeError: something else" in r.stderr
    assert "RuntimeError: Event loop is closed\n" not in r.stderr
