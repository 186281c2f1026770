"""LLM judging (TinyStories protocol): answer parsing, grading against a flaky fake OpenAI server
and a Gemini-protocol server (real SDK, through the CLI), resume, key hygiene, and `complete`
with a tiny random jaxlm model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_judge_server import FakeJudgeServer, expected_grade

from jaxlm.errors import UserError
from jaxlm.judge import (
    MalformedGrade,
    compare,
    cut_story,
    judge_file,
    make_prompt,
    parse_grade,
    read_inputs,
)
from jaxlm.llm import RetryPolicy, make_client
from jaxlm.mt.store import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "judge.py"
KEY = "sk-FAKE-judge-key-must-never-leak-77"
FAST = RetryPolicy(max_attempts=8, base_delay=0.01, timeout=2.0)


def _client(srv, provider="openai"):
    url = srv.url + "/v1" if provider == "openai" else srv.url
    return make_client(provider, "judge-x", url, api_key=KEY, retry=FAST, sleep=lambda s: None)


def _inputs(path: Path, n: int) -> Path:
    rows = [
        {"id": f"s{i}", "prompt": f"كان يا ما كان قطة صغيرة رقم {i}", "completion": f"لعبت {i}."}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _check(out: Path, n: int) -> list[dict]:
    recs = list(read_jsonl(out))
    assert len(recs) == n and len({r["id"] for r in recs}) == n
    for r in recs:
        i = int(r["id"][1:])
        want = expected_grade(f"لعبت {i}.")
        assert (r["grammar"], r["creativity"], r["consistency"], r["age_group"]) == want
        assert r["assessment"].startswith("The student") and r["judge_model"] == "judge-x"
    return recs


def _no_leak(tmp_path: Path, *texts: str) -> None:
    assert all(KEY not in t for t in texts)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(encoding="utf-8", errors="replace"), f


# ---------------------------------------------------------------------------- parsing


def test_prompt_marks_beginning_and_completion():
    p = make_prompt("كان هناك ولد اسمه", " علي، وكان يحب الكرة.")
    assert "كان هناك ولد اسمه *** علي، وكان يحب الكرة." in p
    assert '"age_group"' in p and "13-16" in p


def test_parse_json_line():
    g = parse_grade(
        'Good story.\n{"grammar": 8, "creativity": 6, "consistency": 7, "age_group": "C"}'
    )
    assert (g.grammar, g.creativity, g.consistency, g.age_group) == (8, 6, 7, "C")
    assert g.assessment == "Good story."


def test_parse_fenced_json_with_arabic_digits_and_strings():
    obj = '{"Grammar": "٩/10", "creativity": ٣, "consistency": 10.0, "Age group": "D: 8-9"}'
    text = f"نص.\n```json\n{obj}\n```"
    g = parse_grade(text)
    assert (g.grammar, g.creativity, g.consistency, g.age_group) == (9, 3, 10, "D")
    assert g.assessment == "نص."


def test_parse_score_lines_english_and_arabic():
    g = parse_grade(
        "Nice.\n\n**Grammar:** 8/10\nCreativity: 5 / 10\n- Consistency = 7\nAge group: (B) 4-5"
    )
    assert (g.grammar, g.creativity, g.consistency, g.age_group) == (8, 5, 7, "B")
    assert g.assessment == "Nice."
    g = parse_grade("جيد.\nالقواعد: ٧/١٠\nالإبداع: ٤\nالاتساق: ٩\nالفئة العمرية: E")
    assert (g.grammar, g.creativity, g.consistency, g.age_group) == (7, 4, 9, "E")


@pytest.mark.parametrize(
    "text",
    [
        "A lovely story, well done!",
        '{"grammar": 8, "creativity": 6, "consistency": 7}',  # no age group
        '{"grammar": 11, "creativity": 6, "consistency": 7, "age_group": "C"}',
        '{"grammar": 7.5, "creativity": 6, "consistency": 7, "age_group": "C"}',
        '{"grammar": 0, "creativity": 6, "consistency": 7, "age_group": "C"}',
        '{"grammar": 8, "creativity": 6, "consistency": 7, "age_group": "G"}',
        '{"grammar": true, "creativity": 6, "consistency": 7, "age_group": "C"}',
        "Grammar: 8/10\nCreativity: 6/10",
        '{"grammar": NaN, "creativity": 6, "consistency": 7, "age_group": "C"}',
        '{"grammar": Infinity, "creativity": 6, "consistency": 7, "age_group": "C"}',
        '{"grammar": 8, "creativity": 6, "consistency": 7, "age_group": "A or B"}',
        "Grammar: 4/5\nCreativity: 3/5\nConsistency: 5/5\nAge group: C",  # not out of 10
        "Grammar: 7-8\nCreativity: 6/10\nConsistency: 8/10\nAge group: C",
        "Grammar: 7/10\nCreativity: 6/10\nConsistency: 8/10\nAge group: a 6-7 year old",
    ],
)
def test_parse_malformed_raises(text):
    with pytest.raises(MalformedGrade):
        parse_grade(text)


def test_cut_story_keeps_a_word_boundary():
    story = "كان يا ما كان\nفي قديم الزمان ولد صغير اسمه علي."
    head, rest = cut_story(story, 0.4)
    assert head == "كان يا ما كان" and rest.startswith("في")
    assert cut_story("a b", 0.01) == ("a", "b") and cut_story("a b", 0.99) == ("a", "b")


def test_bad_input_lines_name_file_and_line(tmp_path):
    p = tmp_path / "in.jsonl"
    cases = {
        '{"id": 1, "prompt": "x"}': "missing field 'completion'",
        "not json": "not a JSON line",
        '{"id": 1, "prompt": "x", "completion": 3}': "'completion' must be a string",
    }
    for line, msg in cases.items():
        p.write_text('{"id": 0, "prompt": "a", "completion": "b"}\n' + line + "\n")
        with pytest.raises(UserError, match=rf"in.jsonl:2: .*{msg}"):
            read_inputs(p)
    # a byte order mark (Windows editors write one) is dropped; bad bytes name their line
    p.write_bytes(b'\xef\xbb\xbf{"id": 0, "prompt": "a", "completion": "b"}\n\xff\n')
    with pytest.raises(UserError, match=r"in.jsonl:2: undecodable"):
        read_inputs(p)
    p.write_bytes(b'\xef\xbb\xbf{"id": 0, "prompt": "a", "completion": "b"}\n')
    assert read_inputs(p) == [{"id": 0, "prompt": "a", "completion": "b"}]


# ---------------------------------------------------------------------------- grading


def test_grade_flaky_openai_server_resume_and_no_leak(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 24), tmp_path / "grades.jsonl"
    fail = {"429": 0.1, "500": 0.1, "malformed": 0.1, "bad_grade": 0.15}
    with FakeJudgeServer(fail=fail, seed=3) as srv:
        client = _client(srv)
        half = judge_file(inputs, out, client, concurrency=3, max_retries_malformed=5, limit=12)
        with out.open("ab") as f:
            f.write(b'{"id": "s9')  # a torn line, as a killed run leaves
        full = judge_file(inputs, out, client, concurrency=3, max_retries_malformed=5)
    print(f"server calls {dict(srv.counts)}; summary {full}")
    assert half["graded_total"] == 12 and full["graded_this_run"] == 12
    assert full["graded_total"] == 24 and not full["failures"]
    assert srv.counts["bad_grade"] > 0 and srv.counts["429"] + srv.counts["500"] > 0
    assert srv.keys_seen == {KEY}
    recs = _check(out, 24)
    assert full["scores"]["grammar"]["n"] == 24
    mean = sum(r["grammar"] for r in recs) / 24
    assert full["scores"]["grammar"]["mean"] == pytest.approx(mean, abs=1e-3)
    _no_leak(tmp_path, json.dumps(full), repr(client))


def test_grade_failures_are_counted_and_retried_by_a_rerun(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 4), tmp_path / "grades.jsonl"
    with FakeJudgeServer(fail={"bad_grade": 1.0}) as srv:
        s = judge_file(inputs, out, _client(srv), concurrency=2, max_retries_malformed=1)
    assert s["failures"] == {"MalformedGrade": 4} and s["graded_total"] == 0
    assert srv.counts["bad_grade"] == 8  # each item asked twice
    with FakeJudgeServer(fail={"500": 1.0}) as srv:  # fails for good after the client's retries
        s = judge_file(inputs, out, _client(srv), concurrency=2)
    assert s["failures"] == {"ServerError": 4} and s["graded_total"] == 0
    with FakeJudgeServer() as srv:
        s = judge_file(inputs, out, _client(srv), concurrency=2)
    assert s["graded_total"] == 4 and not s["failures"]
    _check(out, 4)


def _cli(args, env_key: str) -> subprocess.CompletedProcess:
    env = {**os.environ, env_key: KEY}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_grade_gemini_protocol_and_compare(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 8), tmp_path / "grades.jsonl"
    fast = ["--timeout", "2", "--base-delay", "0.01", "--max-attempts", "8"]
    with FakeJudgeServer(fail={"429": 0.15, "500": 0.1, "bad_grade": 0.15}, seed=4) as srv:
        args = ["grade", "--inputs", str(inputs), "--out", str(out), "--provider", "gemini"]
        args += ["--model", "judge-x", "--base-url", srv.url, "--concurrency", "3"]
        r = _cli([*args, *fast, "--max-retries-malformed", "5"], "GEMINI_API_KEY")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["graded_total"] == 8 and srv.keys_seen == {KEY}
    _check(out, 8)
    other = tmp_path / "other.jsonl"
    other.write_text(
        "".join(json.dumps({**x, "grammar": 10}) + "\n" for x in read_jsonl(out)), "utf-8"
    )
    c = _cli(["compare", str(out), str(other)], "OPENAI_API_KEY")
    assert c.returncode == 0, c.stderr
    table = json.loads(c.stdout)
    assert table["n"] == [8, 8] and table["grammar"][1] == 10.0
    assert table["delta_last_minus_first"]["grammar"] == pytest.approx(10 - table["grammar"][0])
    assert table["delta_last_minus_first"]["creativity"] == 0
    assert table == compare([out, other]) | {"files": [str(out), str(other)]}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    args = ["grade", "--inputs", str(bad), "--out", str(tmp_path / "g2.jsonl")]
    e = _cli(
        [*args, "--provider", "openai", "--model", "m", "--base-url", srv.url], "OPENAI_API_KEY"
    )
    assert e.returncode == 2 and e.stderr.strip().count("\n") == 0
    assert "bad.jsonl:1: missing field 'prompt'" in e.stderr
    _no_leak(tmp_path, r.stdout, r.stderr, c.stdout, e.stderr)


# ---------------------------------------------------------------------------- completing


def test_complete_with_a_tiny_random_model(tmp_path):
    from jaxlm import tokenizer
    from jaxlm.checkpoint import save_model
    from jaxlm.config import preset
    from jaxlm.data.demo_corpus import generate
    from jaxlm.judge import main
    from jaxlm.model import init_model

    stories = generate("native", 50, 0)
    tok = tokenizer.train(
        stories, tmp_path / "tok", vocab_size=400
    )  # >= 256 byte pieces + characters
    model = init_model(preset("ts-1m", vocab_size=tok.vocab_size), 0)
    ckpt = save_model(tmp_path / "model", model, tokenizer=str(tmp_path / "tok"))
    src = tmp_path / "stories.jsonl"
    src.write_text(
        "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in stories[:5]), "utf-8"
    )
    out = tmp_path / "inputs.jsonl"
    args = ["complete", "--checkpoint", str(ckpt), "--stories", str(src), "--n", "3"]
    assert main([*args, "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    recs = read_inputs(out)
    assert [r["id"] for r in recs] == ["story-000000", "story-000001", "story-000002"]
    for r, story in zip(recs, stories, strict=False):
        assert story.startswith(r["prompt"]) and r["reference"] and isinstance(r["completion"], str)
        n_words = len(story.split())
        assert abs(len(r["prompt"].split()) - 0.4 * n_words) <= 1
