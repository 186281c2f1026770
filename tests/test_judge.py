"""LLM judging (TinyStories protocol): answer parsing (with plot), grading against a flaky fake
OpenAI server and a Gemini-protocol server (real SDK, through the CLI), keyed resume and the
refusal of a grades file of another source, repeats, bootstrap intervals, paired comparison,
judge agreement, key hygiene, and `complete` with a tiny random jaxlm model."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers_judge_server import FakeJudgeServer, expected_grade

from jaxlm.cli import main
from jaxlm.errors import UserError
from jaxlm.judge.agreement import agreement
from jaxlm.judge.complete import cut_story
from jaxlm.judge.grade import (
    PROMPT,
    PROMPT_VERSION,
    REMINDER,
    GradeOptions,
    MalformedGrade,
    judge_file,
    make_prompt,
    parse_grade,
    read_inputs,
)
from jaxlm.judge.stats import SCORES, bootstrap_ci, compare, load_grades, mean_ci, summarize
from jaxlm.llm import RetryPolicy, make_client
from jaxlm.store import read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CMD = ["-m", "jaxlm.cli", "judge"]
KEY = "sk-FAKE-judge-key-must-never-leak-77"
FAST = RetryPolicy(max_attempts=8, base_delay=0.01, timeout=2.0)


def _client(srv, provider="openai", model="judge-x"):
    url = srv.url + "/v1" if provider == "openai" else srv.url
    return make_client(provider, model, url, api_key=KEY, retry=FAST, sleep=lambda s: None)


def _inputs(path: Path, n: int, model: str = "A") -> Path:
    """n judge inputs of checkpoint `model`: the same beginnings for every model, its own
    completions."""
    rows = [
        {"id": f"s{i}", "prompt": f"كان يا ما كان قطة صغيرة رقم {i}",
         "completion": f"لعبت {i} مع {model}.", "checkpoint": f"ckpt-{model}"}
        for i in range(n)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    return path


def _check(out: Path, inputs: Path, repeat: int = 1, model: str = "judge-x") -> list[dict]:
    """Every input graded `repeat` times in `out`, with the fake judge's grades and full keys."""
    items = {it["id"]: it for it in read_inputs(inputs)}
    recs = list(read_jsonl(out))
    assert sorted((r["id"], r["repeat"]) for r in recs) == sorted(
        (i, k) for i in items for k in range(repeat)
    )
    for r in recs:
        it = items[r["id"]]
        assert (*(r[k] for k in SCORES), r["age_group"]) == expected_grade(it["completion"])
        assert r["assessment"].startswith("The student") and r["judge_model"] == model
        assert r["completion_sha256"] == hashlib.sha256(it["completion"].encode()).hexdigest()
        assert r["prompt_sha256"] == hashlib.sha256(it["prompt"].encode()).hexdigest()
        assert r["checkpoint"] == it["checkpoint"] and r["prompt_version"] == PROMPT_VERSION
    return recs


def _no_leak(tmp_path: Path, *texts: str) -> None:
    assert all(KEY not in t for t in texts)
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert KEY not in f.read_text(encoding="utf-8", errors="replace"), f


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _grade(sid, g, c=5, k=5, p=5, *, age="C", repeat=0, prompt=None, completion="x", **src):
    """A hand-made grade record (prompt defaults to one per story id)."""
    return {
        "id": sid, "repeat": repeat, "prompt_sha256": _sha(prompt or f"beginning {sid}"),
        "completion_sha256": _sha(completion), "checkpoint": src.get("checkpoint", "ckpt"),
        "judge_model": src.get("judge_model", "judge-x"), "prompt_version": PROMPT_VERSION,
        "temperature": src.get("temperature", 0.0), "grammar": g, "creativity": c,
        "consistency": k, "plot": p, "age_group": age, "assessment": "",
    }  # fmt: skip


def _write(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), "utf-8")
    return path


def _main(capsys, *args) -> tuple[int, str, str]:
    code = main(["judge", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- parsing


def test_prompt_marks_beginning_and_completion():
    p = make_prompt("كان هناك ولد اسمه", " علي، وكان يحب الكرة.")
    assert "كان هناك ولد اسمه *** علي، وكان يحب الكرة." in p
    assert '"age_group"' in p and '"plot"' in p and "13-16" in p


def test_prompt_version_names_the_prompt():
    """Editing the prompt (or the reminder) without bumping PROMPT_VERSION fails here: grades of
    another prompt would otherwise share keys with this one's."""
    known = {"v2-plot": "68a677304176dba55bca8ed1cfcf9e278e6085abaee07a5eb05250f9333afb69"}
    assert hashlib.sha256((PROMPT + REMINDER).encode()).hexdigest() == known[PROMPT_VERSION]


def test_parse_json_line():
    g = parse_grade(
        'Good story.\n{"grammar": 8, "creativity": 6, "consistency": 7, "plot": 4, '
        '"age_group": "C"}'
    )
    assert (g.grammar, g.creativity, g.consistency, g.plot, g.age_group) == (8, 6, 7, 4, "C")
    assert g.assessment == "Good story."


def test_parse_fenced_json_with_arabic_digits_and_strings():
    obj = (
        '{"Grammar": "٩/10", "creativity": ٣, "consistency": 10.0, "Plot": "٥", '
        '"Age group": "D: 8-9"}'
    )
    g = parse_grade(f"نص.\n```json\n{obj}\n```")
    assert (g.grammar, g.creativity, g.consistency, g.plot, g.age_group) == (9, 3, 10, 5, "D")
    assert g.assessment == "نص."


def test_parse_score_lines_english_and_arabic():
    g = parse_grade(
        "Nice.\n\n**Grammar:** 8/10\nCreativity: 5 / 10\n- Consistency = 7\n**Plot**: 6\n"
        "Age group: (B) 4-5"
    )
    assert (g.grammar, g.creativity, g.consistency, g.plot, g.age_group) == (8, 5, 7, 6, "B")
    assert g.assessment == "Nice."
    g = parse_grade("جيد.\nالقواعد: ٧/١٠\nالإبداع: ٤\nالاتساق: ٩\nالحبكة: ٣\nالفئة العمرية: E")
    assert (g.grammar, g.creativity, g.consistency, g.plot, g.age_group) == (7, 4, 9, 3, "E")


_OK = '"creativity": 6, "consistency": 7, "plot": 5'


@pytest.mark.parametrize(
    "text",
    [
        "A lovely story, well done!",
        '{"grammar": 8, ' + _OK + "}",  # no age group
        # the first prompt version's answers, without plot, are malformed under this one
        '{"grammar": 8, "creativity": 6, "consistency": 7, "age_group": "C"}',
        "Grammar: 8/10\nCreativity: 6/10\nConsistency: 7/10\nAge group: C",
        '{"grammar": 8, ' + _OK.replace("5", "11") + ', "age_group": "C"}',  # plot 11
        '{"grammar": 8, ' + _OK.replace("5", "4.5") + ', "age_group": "C"}',
        '{"grammar": 11, ' + _OK + ', "age_group": "C"}',
        '{"grammar": 7.5, ' + _OK + ', "age_group": "C"}',
        '{"grammar": 0, ' + _OK + ', "age_group": "C"}',
        '{"grammar": 8, ' + _OK + ', "age_group": "G"}',
        '{"grammar": true, ' + _OK + ', "age_group": "C"}',
        "Grammar: 8/10\nCreativity: 6/10",
        '{"grammar": NaN, ' + _OK + ', "age_group": "C"}',
        '{"grammar": Infinity, ' + _OK + ', "age_group": "C"}',
        '{"grammar": 8, ' + _OK + ', "age_group": "A or B"}',
        "Grammar: 4/5\nCreativity: 3/5\nConsistency: 5/5\nPlot: 4/5\nAge group: C",  # out of 5
        "Grammar: 7-8\nCreativity: 6/10\nConsistency: 8/10\nPlot: 6/10\nAge group: C",
        "Grammar: 7/10\nCreativity: 6/10\nConsistency: 8/10\nPlot: 6/10\nAge group: a 6-7 year old",
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
        '{"prompt": "x", "completion": "y"}': "missing field 'id'",
        '{"id": 1, "prompt": "x"}': "missing field 'completion'",
        "not json": "not a JSON line",
        "[1, 2]": "expected an object",
        '{"id": 1, "prompt": "x", "completion": 3}': "'completion' must be a string",
        '{"id": 1, "prompt": "x", "completion": "y", "checkpoint": 3}': "'checkpoint' must be",
        '{"id": 0, "prompt": "x", "completion": "y"}': "duplicate id 0",
        '{"id": 1, "prompt": "x", "completion": "y", "checkpoint": "B"}': "differs from the first",
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


def test_bad_options_and_paths_are_one_line_errors(tmp_path):
    inputs = _inputs(tmp_path / "in.jsonl", 2)
    for kw in ({"concurrency": 0}, {"repeat": 0}, {"limit": 0}, {"temperature": -1}):
        with pytest.raises(UserError, match="must be"):
            GradeOptions(**kw)
    client = make_client("openai", "m", "http://127.0.0.1:9/v1", api_key=KEY)
    with pytest.raises(UserError, match="is the inputs file"):
        judge_file(inputs, tmp_path / "." / "in.jsonl", client)
    with pytest.raises(UserError, match="is not a file"):
        judge_file(inputs, tmp_path, client)
    grades = _write(tmp_path / "g.jsonl", [_grade("s0", 5)])
    grades.write_text(grades.read_text()[:-1].replace('"plot": 5, ', "") + "\n")
    with pytest.raises(UserError, match=r"g.jsonl:1: missing field 'plot' \(graded with an older"):
        load_grades(grades)
    _write(grades, [_grade("s0", 5), _grade("s0", 6)])
    with pytest.raises(UserError, match=r"g.jsonl:2: story 's0' repeat 0 is graded twice"):
        load_grades(grades)
    _write(grades, [_grade("s0", 5), _grade("s1", 6, judge_model="other")])
    with pytest.raises(UserError, match=r"g.jsonl:2: a grade of checkpoint 'ckpt' judged by 'oth"):
        load_grades(grades)


# ---------------------------------------------------------------------------- grading


def test_grade_flaky_openai_server_resume_and_no_leak(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 24), tmp_path / "grades.jsonl"
    fail = {"429": 0.1, "500": 0.1, "malformed": 0.1, "bad_grade": 0.15}
    with FakeJudgeServer(fail=fail, seed=3) as srv:
        client = _client(srv)
        opts = GradeOptions(concurrency=3, max_retries_malformed=5, limit=12)
        half = judge_file(inputs, out, client, opts)
        with out.open("ab") as f:
            f.write(b'{"id": "s9')  # a torn line, as a killed run leaves
        full = judge_file(inputs, out, client, GradeOptions(concurrency=3, max_retries_malformed=5))
    print(f"server calls {dict(srv.counts)}; summary {full}")
    assert half["graded_total"] == 12 and full["graded_this_run"] == 12
    assert full["graded_total"] == 24 and not full["failures"]
    assert srv.counts["bad_grade"] > 0 and srv.counts["429"] + srv.counts["500"] > 0
    assert srv.keys_seen == {KEY}
    recs = _check(out, inputs)
    scores = full["scores"]
    assert scores["n_stories"] == 24 and scores["checkpoint"] == "ckpt-A"
    for k in SCORES:
        mean = sum(r[k] for r in recs) / 24
        assert scores[k]["mean"] == pytest.approx(mean, abs=1e-4)
        assert scores[k]["ci95"][0] <= scores[k]["mean"] <= scores[k]["ci95"][1]
    assert full["agreement"] is None  # one grade per item
    json.dumps(full, allow_nan=False)
    _no_leak(tmp_path, json.dumps(full), repr(client))


def test_grade_failures_are_counted_and_retried_by_a_rerun(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 4), tmp_path / "grades.jsonl"
    opts = GradeOptions(concurrency=2, max_retries_malformed=1)
    with FakeJudgeServer(fail={"bad_grade": 1.0}) as srv:
        s = judge_file(inputs, out, _client(srv), opts)
    assert s["failures"] == {"MalformedGrade": 4} and s["graded_total"] == 0
    assert srv.counts["bad_grade"] == 8 and s["scores"] is None  # each item asked twice
    with FakeJudgeServer(fail={"old_style": 1.0}) as srv:  # grades without plot: not read
        s = judge_file(inputs, out, _client(srv), opts)
    assert s["failures"] == {"MalformedGrade": 4} and srv.counts["old_style"] == 8
    with FakeJudgeServer(fail={"500": 1.0}) as srv:  # fails for good after the client's retries
        s = judge_file(inputs, out, _client(srv), GradeOptions(concurrency=2))
    assert s["failures"] == {"ServerError": 4} and s["graded_total"] == 0
    with FakeJudgeServer(fail={"old_style": 0.5}, seed=1) as srv:  # re-asked until it has plot
        s = judge_file(inputs, out, _client(srv), GradeOptions(max_retries_malformed=8))
    assert s["graded_total"] == 4 and not s["failures"] and srv.counts["old_style"] > 0
    _check(out, inputs)


def test_rerun_is_keyed_and_another_source_is_refused(tmp_path):
    """Model B's completions of the same story ids, graded into model A's grades file, are
    refused (never answered with A's grades); --overwrite replaces the file with B's grades."""
    a, b = _inputs(tmp_path / "a.jsonl", 6, "A"), _inputs(tmp_path / "b.jsonl", 6, "B")
    out = tmp_path / "out.jsonl"
    with FakeJudgeServer() as srv:
        judge_file(a, out, _client(srv))
        again = judge_file(a, out, _client(srv))  # the same key: nothing to do
        assert again["graded_this_run"] == 0 and srv.counts["ok"] == 6
        before = out.read_bytes()
        with pytest.raises(UserError) as e:
            judge_file(b, out, _client(srv))
        msg = str(e.value)
        assert "\n" not in msg and "'ckpt-A'" in msg and "'ckpt-B'" in msg
        assert "new --out" in msg and "--overwrite" in msg
        with pytest.raises(
            UserError, match="judged by 'judge-x'.*this run grades .*judged by 'judge-y'"
        ):
            judge_file(a, out, _client(srv, model="judge-y"))  # another judge
        with pytest.raises(UserError, match=r"temperature 0.7"):
            judge_file(a, out, _client(srv), GradeOptions(temperature=0.7))
        regenerated = _write(tmp_path / "a2.jsonl", [
            {**it, "completion": it["completion"] + "!"} if it["id"] == "s3" else it
            for it in read_inputs(a)
        ])  # fmt: skip
        with pytest.raises(UserError, match=r"out.jsonl:\d: a grade of story 's3' .*a2.jsonl"):
            judge_file(regenerated, out, _client(srv))
        assert out.read_bytes() == before and srv.counts["ok"] == 6  # refused before any call
        s = judge_file(b, out, _client(srv), GradeOptions(overwrite=True))
    assert s["graded_total"] == 6 and s["source"]["checkpoint"] == "ckpt-B"
    _check(out, b)  # B's grades only, for B's completions
    assert not (tmp_path / "out.jsonl.overwrite").exists()


def test_overwrite_resumes_its_own_side_file_and_drops_a_foreign_one(tmp_path):
    a, b = _inputs(tmp_path / "a.jsonl", 5, "A"), _inputs(tmp_path / "b.jsonl", 5, "B")
    out, ref = tmp_path / "out.jsonl", tmp_path / "ref.jsonl"
    side = tmp_path / "out.jsonl.overwrite"
    with FakeJudgeServer() as srv:
        judge_file(a, out, _client(srv))
        judge_file(b, ref, _client(srv))
        side.write_text("".join(ref.read_text().splitlines(keepends=True)[:2]))  # a stopped run
        s = judge_file(b, out, _client(srv), GradeOptions(overwrite=True))
        assert s["graded_this_run"] == 3 and s["graded_total"] == 5
        _check(out, b)
        side.write_text(out.read_text())  # a side file of B, then an overwrite with A's inputs
        s = judge_file(a, out, _client(srv), GradeOptions(overwrite=True))
        assert s["graded_this_run"] == 5
    _check(out, a)
    old = _write(tmp_path / "v1.jsonl", [{"id": "s0", "grammar": 5, "judge_model": "judge-x"}])
    with pytest.raises(UserError, match="prompt version None.*prompt version 'v2-plot'"):
        judge_file(a, old, _client(srv))  # a grades file of the first prompt version


def test_repeat_grades_each_item_k_times_and_reports_agreement(tmp_path):
    inputs, out = _inputs(tmp_path / "in.jsonl", 8), tmp_path / "grades.jsonl"
    with FakeJudgeServer(jitter=0.3, seed=5) as srv:
        opts = GradeOptions(repeat=2, temperature=0.7, concurrency=4)
        s = judge_file(inputs, out, _client(srv), opts)
        assert s["graded_this_run"] == 16 and srv.counts["ok"] == 16
        s3 = judge_file(inputs, out, _client(srv), GradeOptions(repeat=3, temperature=0.7))
        assert s3["graded_this_run"] == 8 and srv.counts["ok"] == 24  # only repeat 2 is new
    recs = list(read_jsonl(out))
    assert sorted({r["repeat"] for r in recs}) == [0, 1, 2] and len(recs) == 24
    assert s3["scores"]["n_stories"] == 8 and s3["scores"]["n_grades"] == 24
    ag = s3["agreement"]
    full = agreement([out])
    assert {k: full[k] for k in ag} == ag and ag["pairs"] == 24 and ag["stories"] == 8
    for k in SCORES:  # the jittered judge moves a score by one point at most
        f = ag["scores"][k]
        assert f["within_1"] == 1.0 and 0 < f["mean_abs_diff"] <= 1
        assert f["mean_abs_diff_ci95"][0] <= f["mean_abs_diff"] <= f["mean_abs_diff_ci95"][1]
    assert min(ag["scores"][k]["exact"] for k in SCORES) < 1
    assert ag["age_group"] == {"exact": 1.0, "within_1": 1.0}
    assert "warning" not in s3
    json.dumps(s3, allow_nan=False)


# ---------------------------------------------------------------------------- statistics


def test_bootstrap_hand_checked_cases():
    # two stories scoring 0 and 10: a resample is {0,0}, {0,10} or {10,10} with chances
    # 1/4, 1/2, 1/4, so the 2.5th and 97.5th percentiles of its mean are 0 and 10
    mean, ci = mean_ci(np.array([0.0, 10.0]))
    assert mean[0] == 5 and ci[:, 0].tolist() == [0.0, 10.0]
    # 10 of 20 stories score 1: a resampled mean is Binomial(20, 1/2) / 20, whose 2.5% and 97.5%
    # quantiles are 6/20 and 14/20 (P(X <= 5) = 0.021, P(X <= 6) = 0.058, P(X <= 13) = 0.942,
    # P(X <= 14) = 0.979)
    _, ci = mean_ci(np.array([1.0] * 10 + [0.0] * 10), resamples=20000)
    assert ci[:, 0].tolist() == pytest.approx([0.3, 0.7])
    _, ci = mean_ci(np.full((7, 2), 4.0))  # no spread, no width
    assert ci.tolist() == [[4.0, 4.0], [4.0, 4.0]]
    x = np.arange(30.0)
    a, b = mean_ci(x, seed=1)[1], mean_ci(x, seed=1)[1]
    assert (a == b).all() and not (a == mean_ci(x, seed=2)[1]).all()  # seeded
    with pytest.raises(UserError, match="at least 1000"):
        bootstrap_ci(3, lambda idx: idx.mean(1), resamples=100)


def test_bootstrap_interval_contains_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    widths = {}
    for n in (25, 400):
        x = rng.integers(1, 11, size=n).astype(float)
        mean, ci = mean_ci(x)
        assert ci[0, 0] < mean[0] < ci[1, 0]
        widths[n] = ci[1, 0] - ci[0, 0]
        sem = x.std(ddof=1) / np.sqrt(n)  # the normal interval's half width / 1.96
        assert widths[n] == pytest.approx(2 * 1.96 * sem, rel=0.2)
    assert widths[400] < widths[25] / 3  # ~ 1/sqrt(16) = 1/4


def test_summary_scores_a_story_by_the_mean_of_its_repeats():
    recs = [_grade("s0", 4, repeat=0), _grade("s0", 6, repeat=1), _grade("s1", 8, age="D")]
    s = summarize(recs)
    assert (s["n_stories"], s["n_grades"]) == (2, 3)
    assert s["grammar"]["mean"] == 6.5  # (5 + 8) / 2, not (4 + 6 + 8) / 3
    assert s["grammar"]["std"] == pytest.approx(np.std([5, 8], ddof=1), abs=1e-4)
    assert s["grammar"]["ci95"] == [5.0, 8.0]  # two stories: the resampled means 5, 6.5, 8
    assert s["creativity"] == {"mean": 5.0, "std": 0.0, "ci95": [5.0, 5.0]}
    assert s["age_groups"] == {"C": 2, "D": 1} and s["checkpoint"] == "ckpt"


def test_paired_compare_on_crafted_files(tmp_path):
    a = [_grade(f"s{i}", g, 5, 4) for i, g in enumerate([5, 6, 7, 8])]
    a += [_grade("s5", 9), _grade("s7", 9)]
    b = [_grade(f"s{i}", g, 5, 6, completion="y") for i, g in enumerate([7, 6, 9, 7])]
    b += [_grade("s0", 7, 5, 2, repeat=1, completion="y")]  # s0's consistency: (6 + 2) / 2 = 4
    b += [_grade("s6", 1), _grade("s7", 1, prompt="another beginning")]
    fa, fb = _write(tmp_path / "a.jsonl", a), _write(tmp_path / "b.jsonl", b)
    c = compare([fa, fb])
    (pair,) = c["comparisons"]
    assert pair["matched"] == 4 and not c["warnings"]
    assert pair["unmatched"] == {
        "only_in_first": {"n": 1, "ids": ["s5"]}, "only_in_second": {"n": 1, "ids": ["s6"]},
        "text_differs": {"n": 1, "ids": ["s7"]},
    }  # fmt: skip
    g = pair["scores"]["grammar"]  # s0..s3: B - A = 2, 0, 2, -1 (s0: (7 + 7) / 2 - 5)
    assert (g["mean_a"], g["mean_b"], g["diff_b_minus_a"]) == (6.5, 7.25, 0.75)
    assert (g["b_better"], g["a_better"], g["ties"]) == (0.5, 0.25, 0.25)
    assert -1 <= g["ci95"][0] < 0.75 < g["ci95"][1] <= 2
    assert pair["scores"]["creativity"] | {"ci95": None} == {
        "mean_a": 5.0, "mean_b": 5.0, "diff_b_minus_a": 0.0, "ci95": None,
        "b_better": 0.0, "a_better": 0.0, "ties": 1.0,
    }  # fmt: skip
    k = pair["scores"]["consistency"]  # 4 -> 4 (s0, repeats averaged), 6, 6, 6
    assert (k["diff_b_minus_a"], k["b_better"], k["ties"]) == (1.5, 0.75, 0.25)
    assert c["summaries"][0]["n_stories"] == 6 and c["summaries"][1]["n_grades"] == 7
    alone = compare([fa])  # one file: its summary, nothing to pair
    assert alone["comparisons"] == [] and alone["summaries"] == c["summaries"][:1]
    other = _write(tmp_path / "c.jsonl", [_grade("s0", 5, judge_model="judge-y")])
    c3 = compare([fa, fb, other])
    assert [p["b"] for p in c3["comparisons"]] == [str(fb), str(other)]
    assert c3["comparisons"][1]["matched"] == 1
    assert c3["warnings"] == [f"{fa} and {other} were graded by different judges"]
    json.dumps(c3, allow_nan=False)
    with pytest.raises(UserError, match="named twice"):
        compare([fa, tmp_path / "." / "a.jsonl"])


def test_agreement_on_crafted_files(tmp_path):
    from scipy import stats

    x, y = [1, 2, 3, 4, 5], [2, 2, 3, 5, 5]
    xc, yc = [3, 3, 3, 3, 3], [3, 4, 3, 2, 3]
    xk, yk = [1, 10, 5, 5, 5], [10, 1, 5, 6, 3]
    first = [_grade(f"s{i}", x[i], xc[i], xk[i], 7, age="ABCDE"[i]) for i in range(5)]
    second = [
        _grade(f"s{i}", y[i], yc[i], yk[i], 7, age="ACEDF"[i], judge_model="judge-y")
        for i in range(5)
    ]
    first.append(_grade("s8", 5))
    second += [_grade("s9", 5, judge_model="judge-y")]
    second += [_grade("s8", 5, completion="regenerated", judge_model="judge-y")]
    f1, f2 = _write(tmp_path / "g1.jsonl", first), _write(tmp_path / "g2.jsonl", second)
    ag = agreement([f1, f2])
    json.dumps(ag, allow_nan=False)
    assert (ag["mode"], ag["pairs"], ag["stories"]) == ("two files", 5, 5)
    assert ag["unmatched"]["text_differs"]["ids"] == ["s8"]
    assert ag["unmatched"]["only_in_second"]["ids"] == ["s9"]
    g = ag["scores"]["grammar"]
    # by hand: deviations (-2,-1,0,1,2) and (-1.4,-1.4,-0.4,1.6,1.6): r = 9 / sqrt(10 * 9.2);
    # ranks of y (1.5, 1.5, 3, 4.5, 4.5): rho = 9 / sqrt(10 * 9)
    assert g["pearson"] == pytest.approx(9 / np.sqrt(92), abs=1e-4)
    assert g["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-4)
    assert g["spearman"] == pytest.approx(9 / np.sqrt(90), abs=1e-4)
    assert g["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-4)
    assert (g["mean_abs_diff"], g["exact"], g["within_1"]) == (0.4, 0.6, 1.0)
    assert g["mean_diff_second_minus_first"] == 0.4
    assert 0 <= g["mean_abs_diff_ci95"][0] <= 0.4 <= g["mean_abs_diff_ci95"][1] <= 1
    c = ag["scores"]["creativity"]  # a constant side: no correlation, not 0
    assert (c["pearson"], c["spearman"], c["mean_abs_diff"], c["exact"]) == (None, None, 0.4, 0.6)
    k = ag["scores"]["consistency"]  # |diff| 9, 9, 0, 1, 2
    assert (k["mean_abs_diff"], k["exact"], k["within_1"]) == (4.2, 0.2, 0.4)
    assert k["spearman"] == pytest.approx(stats.spearmanr(xk, yk)[0], abs=1e-4)
    p = ag["scores"]["plot"]  # identical and constant
    assert (p["mean_abs_diff"], p["mean_abs_diff_ci95"], p["exact"]) == (0.0, [0.0, 0.0], 1.0)
    assert ag["age_group"] == {"exact": 0.4, "within_1": 0.8}  # letter gaps 0, 1, 2, 0, 1
    assert [s["judge_model"] for s in ag["sources"]] == ["judge-x", "judge-y"]


def test_agreement_of_repeats_in_one_file(tmp_path):
    recs = [_grade("s0", g, repeat=r) for r, g in enumerate([4, 5, 7])] + [_grade("s1", 3)]
    f = _write(tmp_path / "g.jsonl", recs)
    ag = agreement([f])
    # s0's pairs (4, 5), (4, 7), (5, 7): |diff| 1, 3, 2; s1 has one grade and no pair
    assert (ag["mode"], ag["pairs"], ag["stories"]) == ("repeats", 3, 1)
    g = ag["scores"]["grammar"]
    assert (g["mean_abs_diff"], g["mean_abs_diff_ci95"], g["exact"]) == (2.0, [2.0, 2.0], 0.0)
    assert g["within_1"] == pytest.approx(1 / 3, abs=1e-4)
    single = _write(tmp_path / "one.jsonl", [_grade("s0", 4), _grade("s1", 4)])
    with pytest.raises(UserError, match="no story is graded twice; grade with --repeat 2"):
        agreement([single])
    with pytest.raises(UserError, match="named twice"):
        agreement([f, f])
    with pytest.raises(UserError, match="share no graded item"):
        agreement([f, _write(tmp_path / "other.jsonl", [_grade("s5", 4)])])


# ---------------------------------------------------------------------------- the command line


def _cli(args, env_key: str) -> subprocess.CompletedProcess:
    env = {**os.environ, env_key: KEY}
    return subprocess.run(
        [sys.executable, *CMD, *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_grade_gemini_protocol_refusal_compare_and_agreement(tmp_path, capsys, monkeypatch):
    a, out = _inputs(tmp_path / "a.jsonl", 8, "A"), tmp_path / "grades.jsonl"
    fast = ["--timeout", "2", "--base-delay", "0.01", "--max-attempts", "8"]
    with FakeJudgeServer(fail={"429": 0.15, "500": 0.1, "bad_grade": 0.15}, seed=4) as srv:
        args = ["grade", "--inputs", str(a), "--out", str(out), "--provider", "gemini"]
        args += ["--model", "judge-x", "--base-url", srv.url, "--concurrency", "3"]
        r = _cli([*args, *fast, "--max-retries-malformed", "5"], "GEMINI_API_KEY")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["graded_total"] == 8 and srv.keys_seen == {KEY}
    _check(out, a)

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    b, out_b = _inputs(tmp_path / "b.jsonl", 8, "B"), tmp_path / "grades_b.jsonl"
    with FakeJudgeServer(jitter=0.5) as srv:
        grade = ["grade", "--provider", "openai", "--model", "judge-x", "--base-url", srv.url]
        grade += ["--base-delay", "0.01"]
        code, _, err = _main(capsys, *grade, "--inputs", b, "--out", out)  # A's file
        assert code == 2 and err.count("\n") == 1 and "'ckpt-A'" in err and "'ckpt-B'" in err
        code, _, err = _main(capsys, *grade, "--inputs", b, "--out", b)
        assert code == 2 and "is the inputs file" in err and err.count("\n") == 1
        code, _, _ = _main(capsys, *grade, "--inputs", b, "--out", out_b)
        assert code == 0
        rep = ["--repeat", "2", "--temperature", "0.7"]
        code, stdout, _ = _main(capsys, *grade, "--inputs", a, "--out", tmp_path / "r.jsonl", *rep)
        assert code == 0 and json.loads(stdout)["agreement"]["pairs"] == 8
    code, stdout, _ = _main(capsys, "compare", out, out_b, "--resamples", "1000")
    assert code == 0
    pair = json.loads(stdout)["comparisons"][0]
    assert pair["matched"] == 8 and pair == compare([out, out_b], resamples=1000)["comparisons"][0]
    code, stdout, _ = _main(capsys, "agreement", tmp_path / "r.jsonl")
    assert code == 0 and json.loads(stdout) == agreement([tmp_path / "r.jsonl"])
    for bad in (["compare", tmp_path / "nope.jsonl"], ["agreement", out], ["agreement", a]):
        code, _, err = _main(capsys, *bad)
        assert code == 2 and err.count("\n") == 1, err
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "x", "completion": "y"}])
    args = ["grade", "--inputs", str(bad), "--out", str(tmp_path / "g2.jsonl")]
    e = _cli(
        [*args, "--provider", "openai", "--model", "m", "--base-url", srv.url], "OPENAI_API_KEY"
    )
    assert e.returncode == 2 and e.stderr.strip().count("\n") == 0
    assert "bad.jsonl:1: missing field 'id'" in e.stderr
    _no_leak(tmp_path, r.stdout, r.stderr, e.stderr)


# ---------------------------------------------------------------------------- completing


def test_complete_with_a_tiny_random_model(tmp_path):
    from jaxlm import tokenizer
    from jaxlm.checkpoint import save_model
    from jaxlm.cli import main
    from jaxlm.config import preset
    from jaxlm.data.demo_corpus import generate
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
    args = ["judge", "complete", "--checkpoint", str(ckpt), "--stories", str(src), "--n", "3"]
    assert main([*args, "--out", str(out), "--max-new-tokens", "8", "--batch-size", "2"]) == 0
    recs = read_inputs(out)
    assert [r["id"] for r in recs] == ["story-000000", "story-000001", "story-000002"]
    for r, story in zip(recs, stories, strict=False):
        assert story.startswith(r["prompt"]) and r["reference"] and isinstance(r["completion"], str)
        n_words = len(story.split())
        assert abs(len(r["prompt"].split()) - 0.4 * n_words) <= 1
