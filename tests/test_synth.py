"""Synthetic stories: prompts, validation and de-duplication, and `jaxlm synthesize` end to end
against a local flaky OpenAI-compatible server and a Gemini-protocol server (real SDK),
including kill -9 and resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers_llm_server import FakeLLMServer, fake_story

from jaxlm.store import read_jsonl
from jaxlm.synth.prompts import ADJECTIVES, NOUNS, VERBS, make_prompt
from jaxlm.synth.validate import Deduper, StoryChecks, arabic_share, check_story, has_word

ROOT = Path(__file__).resolve().parents[1]
CMD = ["-m", "jaxlm.cli", "synthesize"]
KEY = "sk-FAKE-key-must-never-leak-42"
FAST = ["--timeout", "0.5", "--base-delay", "0.01", "--max-attempts", "8"]


def test_prompts_are_deterministic_and_name_the_words():
    p = make_prompt(7, 123)
    assert p == make_prompt(7, 123) and p != make_prompt(7, 124) and p != make_prompt(8, 123)
    for word in p.words.values():
        assert f'"{word}"' in p.prompt
    assert (
        p.words["verb"] in VERBS and p.words["noun"] in NOUNS and p.words["adjective"] in ADJECTIVES
    )
    assert 1 <= len(p.features) <= 3 and p.name in p.prompt and arabic_share(p.prompt) > 0.95
    assert len({make_prompt(0, i).prompt for i in range(200)}) == 200


def test_has_word_allows_morphology():
    text = "وذهبت القطة إلى حديقتها، فلعبت بالكرة الكبيرة وقالوا سيلعبون للبيت. ومشت. وأكلنا."
    for word in ["قطة", "حديقة", "لعب", "كرة", "كبير", "بيت", "مشى", "أكل"]:
        assert has_word(text, word), word
    for word in ["بحر", "نام", "قمر", "كتب"]:
        assert not has_word(text, word), word


def test_check_story_reasons():
    words = {"verb": "لعب", "noun": "كرة", "adjective": "كبير"}
    good = fake_story('"لعب" "كرة" "كبير" "سارة"', __import__("random").Random(0))
    checks = StoryChecks()
    assert check_story(good, words, checks) is None
    assert check_story("Once upon a time. " * 40, words, checks) == "arabic_ratio"
    assert check_story("لعب بالكرة الكبيرة.", words, checks) == "too_short"
    assert check_story(good, {**words, "noun": "قمر"}, checks) == "missing_word"


def test_deduper():
    import random

    d = Deduper(threshold=0.7)
    a = fake_story('"لعب" "كرة" "كبير"', random.Random(1))
    b = fake_story('"لعب" "كرة" "كبير"', random.Random(2))
    d.add(a)
    assert d.check(a) == "exact_duplicate"
    assert d.check(a.replace("\n\n", " ") + " ") == "exact_duplicate"  # whitespace-insensitive
    assert d.check(a.replace("الكرة", "القطة") + " وضحك الجميع.") == "near_duplicate"
    assert d.check(b) is None


def _check_outputs(out: Path, n: int) -> list[dict]:
    recs = list(read_jsonl(out))
    ids = [r["id"] for r in recs]
    assert len(recs) == n and len(set(ids)) == n
    assert len({r["index"] for r in recs}) == n
    rejected = {r["index"] for r in read_jsonl(out.with_name(out.stem + ".rejected.jsonl"))}
    assert not rejected & {r["index"] for r in recs}  # prompt indices never reused
    for r in recs:
        assert set(r) >= {"id", "text", "prompt", "words", "features"}
        assert r["prompt"] == make_prompt(0, r["index"]).prompt
        assert check_story(r["text"], r["words"], StoryChecks()) is None
    return recs


def _run(args, env_key: str, timeout=120) -> subprocess.CompletedProcess:
    env = {**os.environ, env_key: KEY}
    return subprocess.run(
        [sys.executable, *CMD, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _no_leak(tmp_path: Path, *procs) -> None:
    for p in procs:
        assert KEY not in p.stdout and KEY not in p.stderr
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(encoding="utf-8", errors="replace"), f


def test_synthesize_flaky_openai_server_reaches_target(tmp_path):
    fail = {
        "429": 0.1,
        "500": 0.1,
        "malformed": 0.1,
        "timeout": 0.05,
        "bad_story": 0.05,
        "dup": 0.1,
    }
    out = tmp_path / "stories.jsonl"
    with FakeLLMServer(fail=fail, seed=1, hang=1.0) as srv:
        args = ["--n", "40", "--out", str(out), "--provider", "openai", "--model", "fake"]
        r = _run(
            [*args, "--base-url", srv.url + "/v1", "--concurrency", "4", *FAST], "OPENAI_API_KEY"
        )
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    failed = sum(v for k, v in srv.counts.items() if k != "ok")
    share = failed / sum(srv.counts.values())
    print(f"server calls {dict(srv.counts)}; {share:.0%} failed; stats {stats}")
    assert stats["accepted_total"] == 40 and sum(stats["rejected"].values()) > 0
    assert failed / sum(srv.counts.values()) > 0.25 and srv.keys_seen == {KEY}
    _check_outputs(out, 40)
    _no_leak(tmp_path, r)


def test_synthesize_gemini_protocol(tmp_path):
    out = tmp_path / "stories.jsonl"
    with FakeLLMServer(fail={"429": 0.15, "500": 0.1, "bad_story": 0.1}, seed=2) as srv:
        args = ["--n", "12", "--out", str(out), "--provider", "gemini", "--model", "gemini-x"]
        r = _run([*args, "--base-url", srv.url, "--concurrency", "3", *FAST], "GEMINI_API_KEY")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["accepted_total"] == 12
    assert srv.keys_seen == {KEY}
    _check_outputs(out, 12)
    _no_leak(tmp_path, r)


def test_synthesize_kill_and_resume(tmp_path):
    out = tmp_path / "stories.jsonl"
    n = 30
    with FakeLLMServer(delay=0.05) as srv:
        args = ["--n", str(n), "--out", str(out), "--provider", "openai", "--model", "fake"]
        args += ["--base-url", srv.url + "/v1", "--concurrency", "2", *FAST]
        env = {**os.environ, "OPENAI_API_KEY": KEY}
        proc = subprocess.Popen([sys.executable, *CMD, *args], env=env, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while time.time() < deadline and (
            not out.exists() or len(out.read_bytes().splitlines()) < 8
        ):
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        first = [r["id"] for r in read_jsonl(out)]
        with out.open("ab") as f:
            f.write(b'{"id": "syn-99')  # torn line
        r = _run(args, "OPENAI_API_KEY")
    assert proc.returncode == -signal.SIGKILL and 8 <= len(first) < n
    assert r.returncode == 0, r.stderr
    ids = [x["id"] for x in _check_outputs(out, n)]
    print(f"killed after {len(first)}/{n} stories; after rerun {len(ids)} unique ids")
    assert set(ids) == {f"syn-{i:07d}" for i in range(n)} and ids[: len(first)] == first
    again = _run(args, "OPENAI_API_KEY")  # nothing left to do
    assert json.loads(again.stdout.strip().splitlines()[-1])["accepted_this_run"] == 0
    assert re.search(r'"accepted_total": 30', again.stdout)
