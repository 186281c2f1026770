"""Translation pipeline: splitter, store, filters, ids and shards, and `jaxlm translate` end to end
on a tiny random M2M100 (both backends), including kill -9 and resume, outputs that do not depend
on the batch, and shard merging."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxlm.errors import UserError
from jaxlm.mt.filters import FilterConfig, check
from jaxlm.mt.io import parse_shard, read_stories, shard_of
from jaxlm.mt.split import split_sentences
from jaxlm.store import JsonlStore, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
CMD = ["-m", "jaxlm.cli", "translate"]
FAST = ["--len-ratio", "0.3", "--len-extra", "4", "--batch-size", "32"]  # short random outputs
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "JAXLM_CT2_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}


# --- sentence splitter ---------------------------------------------------------------------


def test_split_keeps_dialogue_and_abbreviations():
    text = (
        'Tom said, "Wow! Look at that. It is big!" Then he ran. Mr. Lee waved. «Hi. Bye.» Yes…  ok'
    )
    assert split_sentences(text) == [
        'Tom said, "Wow! Look at that. It is big!" ',
        "Then he ran. ",
        "Mr. Lee waved. ",
        "«Hi. Bye.» ",
        "Yes…  ok",
    ]
    assert split_sentences("“Stop! Now.” she cried. He stopped.\n\nEnd.") == [
        "“Stop! Now.” she cried. ",
        "He stopped.\n\n",
        "End.",
    ]


def _balanced(piece: str) -> bool:
    return piece.count('"') % 2 == 0 and piece.count("“") == piece.count("”")


def _to_guillemets(paragraph: str) -> str:
    out, opening = [], True
    for ch in paragraph:
        out.append(("«" if opening else "»") if ch == '"' else ch)
        opening ^= ch == '"'
    return "".join(out)


@pytest.mark.parametrize("name", ["TinyStories_validation_head.txt", "TinyStories_train_head.txt"])
def test_split_real_tinystories(shared_data, name):
    import ftfy

    raw = (shared_data / "tinystories_en" / name).read_text(encoding="utf-8")
    paragraphs = [p for p in raw.split("\n\n") if p.strip()]
    n_sent = n_quoted = 0
    for p in paragraphs:
        assert "".join(split_sentences(p)) == p  # exact round trip on the raw text
        fixed = ftfy.fix_text(p, uncurl_quotes=False)
        pieces = split_sentences(fixed)
        assert "".join(pieces) == fixed
        n_sent += len(pieces)
        if not _balanced(fixed):
            continue  # an unmatched quote in the data protects nothing
        n_quoted += '"' in fixed or "“" in fixed
        assert all(_balanced(s) for s in pieces), pieces
        guil = _to_guillemets(fixed)
        assert all(s.count("«") == s.count("»") for s in split_sentences(guil))
    assert "".join(split_sentences(raw)) == raw
    print(f"{name}: {len(paragraphs)} paragraphs, {n_sent} sentences, {n_quoted} with dialogue")
    assert n_sent > 2 * len(paragraphs) and n_quoted > 50


# --- store, inputs, shards, filters --------------------------------------------------------


def test_store_survives_torn_tail(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlStore(path) as s:
        s.append([{"id": "a"}, {"id": "b"}])
    with path.open("ab") as f:
        f.write(b'{"id": "c", "te')  # killed mid-write
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b"]
    with JsonlStore(path) as s:
        assert s.repaired_bytes == len(b'{"id": "c", "te')
        s.append([{"id": "c"}])
    assert [r["id"] for r in read_jsonl(path)] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(UserError, match=":2:"):
        list(read_jsonl(path))


def test_read_stories_ids(tmp_path):
    (tmp_path / "a.txt").write_text("One.\n\nTwo.\n\nOne.\n")
    (tmp_path / "b.txt").write_text("Story one.\n\nPara two.<|endoftext|>Story two.")
    (tmp_path / "c.jsonl").write_text('{"id": 7, "text": "x"}\n{"text": "y"}\n')
    a = read_stories([tmp_path / "a.txt"])
    assert [s.text for s in a] == ["One.", "Two.", "One."]
    assert a[2].id == a[0].id + "-2" and len({s.id for s in a}) == 3
    assert [s.text for s in read_stories([tmp_path / "b.txt"])] == [
        "Story one.\n\nPara two.",
        "Story two.",
    ]
    c = read_stories([tmp_path / "c.jsonl"])
    assert c[0].id == "7" and c[1].id.startswith("h")
    assert [s.id for s in read_stories([tmp_path / "a.txt"])] == [s.id for s in a]  # stable
    with pytest.raises(UserError, match="text"):
        (tmp_path / "d.jsonl").write_text('{"body": "x"}\n')
        read_stories([tmp_path / "d.jsonl"])
    # a byte order mark (Windows editors write one) is not text; bad bytes name their line
    bom = b"\xef\xbb\xbf"
    (tmp_path / "e.jsonl").write_bytes(bom + b'{"id": 7, "text": "x"}\n')
    (tmp_path / "e.txt").write_bytes(bom + b"One.\n\nTwo.\n")
    assert [s.text for s in read_stories([tmp_path / "e.jsonl", tmp_path / "e.txt"])] == [
        "x",
        "One.",
        "Two.",
    ]
    (tmp_path / "f.jsonl").write_bytes(b'{"text": "x"}\n{"text": "\xff"}\n')
    with pytest.raises(UserError, match=r"f.jsonl:2: undecodable"):
        read_stories([tmp_path / "f.jsonl"])


def test_shards_are_disjoint_and_cover():
    ids = [f"s{i}" for i in range(1000)]
    parts = [{i for i in ids if shard_of(i, 4) == k} for k in range(4)]
    assert sum(map(len, parts)) == 1000 and set().union(*parts) == set(ids)
    assert min(map(len, parts)) > 200
    assert parse_shard("2/4") == (2, 4)
    with pytest.raises(UserError):
        parse_shard("4/4")


def test_filters():
    cfg = FilterConfig()
    src = ["The cat sat on the mat.", "It was happy."]
    assert check(src, ["جلست القطة على الحصيرة.", "كانت سعيدة."], "arb_Arab", cfg) is None
    assert check(src, ["جلست القطة على الحصيرة.", ""], "arb_Arab", cfg) == "empty"
    assert check(src, ["ها" * 30, "كانت سعيدة."], "arb_Arab", cfg) == "repetition"
    assert check(src, ["قطة.", "نعم."], "arb_Arab", cfg) == "length_ratio"
    assert (
        check(src, ["The cat sat on the mat.", "كانت سعيدة جدا."], "arb_Arab", cfg)
        == "untranslated"
    )
    assert (
        check(src, ["Кошка сидела на коврике.", "Она была рада."], "arb_Arab", cfg)
        == "wrong_script"
    )
    assert check(src, ["Кошка сидела на коврике.", "Она была рада."], "ar", cfg) == "wrong_script"
    assert check(src, ["", ""], "arb_Arab", FilterConfig(enabled=())) is None


def test_m2m100_language_codes():
    from transformers import NllbTokenizer

    from jaxlm.mt.backends import resolve_lang
    from jaxlm.mt.testing import make_tiny_tokenizer, tiny_vocab

    nllb = make_tiny_tokenizer()
    assert resolve_lang(nllb, "arb_Arab") == ("arb_Arab", "arb_Arab")
    m2m = NllbTokenizer(
        vocab=tiny_vocab(), merges=[], extra_special_tokens=["__en__", "__ar__"], src_lang="__en__"
    )
    assert resolve_lang(m2m, "ar") == ("ar", "__ar__")
    assert resolve_lang(m2m, "arb_Arab") == ("ar", "__ar__")
    assert resolve_lang(m2m, "eng_Latn") == ("en", "__en__")
    with pytest.raises(UserError):
        resolve_lang(m2m, "xyz_Zzzz")


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    """A mistyped path fails at once (no hub retries); a folder that holds no model says so."""
    from jaxlm.mt.backends import BackendConfig, load_backend

    for name in ("./nope", str(tmp_path / "nope"), "a/b/c"):
        with pytest.raises(UserError, match=rf"--model {re.escape(name)}: no such directory$"):
            load_backend(BackendConfig(model=name))
    with pytest.raises(UserError, match=r"--model .*: cannot load it \(.+\)$"):
        load_backend(BackendConfig(model=str(tmp_path)))


# --- `jaxlm translate` end to end on a tiny random model ----------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from jaxlm.mt.testing import make_tiny_nllb

    return make_tiny_nllb(tmp_path_factory.mktemp("tiny_nllb"))


def _stories(n: int) -> str:
    base = [
        'Lily saw a red ball. She said, "Mom, can I play?" Mom smiled.',
        "Tom had a small dog. The dog liked to run.\n\nOne day, it rained. They stayed home.",
        "Mr. Bob went to the park. He sat on a bench. Birds sang.",
    ]
    return "<|endoftext|>".join(f"{base[i % 3]} Story {i}." for i in range(n))


def _translate(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *CMD, *args],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def _ids(path: Path) -> list[str]:
    return [r["id"] for r in read_jsonl(path)]


def _main_translate(argv: list[str]) -> int:
    from jaxlm.cli import main

    return main(["translate", *argv])


@pytest.fixture
def one_thread(monkeypatch):
    """In-process runs on one torch and one CTranslate2 thread, as the subprocesses (`ENV`): on a
    busy machine a second thread only waits, and a tiny model gains nothing from it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("JAXLM_CT2_THREADS", "1")
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
def test_translate_end_to_end(tmp_path, tiny_model, backend):
    inp = tmp_path / "in.txt"
    inp.write_text(_stories(6))
    out = tmp_path / "ar.jsonl"
    common = [
        "--input",
        str(inp),
        "--out",
        str(out),
        "--model",
        str(tiny_model),
        "--backend",
        backend,
    ]
    common += [
        "--ct2-cache",
        str(tmp_path / "ct2"),
        "--filters",
        "none",
        "--chunk-stories",
        "4",
        *FAST,
    ]
    r = _translate(common)
    assert r.returncode == 0, r.stderr
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["accepted"] == 6 and stats["sentences"] > 6 and stats["sentences_per_s"] > 0
    recs = list(read_jsonl(out))
    assert [x["id"] for x in recs] == [s.id for s in read_stories([inp])]
    assert all(set(x) == {"id", "source", "text"} for x in recs)
    assert "\n\n" in recs[1]["text"]  # paragraphs re-joined in place
    again = json.loads(_translate(common).stdout.strip().splitlines()[-1])
    assert again["todo"] == 0 and _ids(out) == [x["id"] for x in recs]
    if backend == "ctranslate2":
        assert any((tmp_path / "ct2").glob("*/model.bin"))  # converted once, cached


def test_translate_kill_and_resume(tmp_path, tiny_model, one_thread):
    inp = tmp_path / "in.txt"
    inp.write_text(_stories(40))
    target = {s.id for s in read_stories([inp])}
    out = tmp_path / "ar.jsonl"
    args = ["--input", str(inp), "--out", str(out), "--model", str(tiny_model), "--filters", "none"]
    args += ["--chunk-stories", "2", *FAST]
    proc = subprocess.Popen([sys.executable, *CMD, *args], env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and (not out.exists() or len(out.read_bytes().splitlines()) < 4):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = _ids(out)
    assert 4 <= len(first) < len(target)
    with out.open("ab") as f:
        f.write(b'{"id": "torn')  # as if killed mid-line
    r = _translate(args)
    assert r.returncode == 0, r.stderr
    ids = _ids(out)
    print(f"killed after {len(first)}/{len(target)} stories; after rerun {len(ids)} ids")
    assert len(ids) == len(set(ids)) and set(ids) == target and ids[: len(first)] == first
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["todo"] == len(target) - len(first)  # only what was missing, not all again
    ref = tmp_path / "ref.jsonl"  # the same stories in one uninterrupted run
    assert _main_translate([*args[:2], "--out", str(ref), *args[4:]]) == 0
    assert out.read_bytes() == ref.read_bytes()


def _mixed_stories(path: Path) -> Path:
    """Stories whose sentences differ a lot in length, so budgets within a batch differ too."""
    long = (
        "Once upon a time, in a small town by the sea, a little girl named Lily found a shiny "
        "red ball under an old tree, and she ran all the way home to show it to her mother."
    )
    path.write_text(_stories(5) + f"<|endoftext|>{long} Then she slept.<|endoftext|>Hi.")
    return path


@pytest.mark.parametrize("beam", [1, 2])
@pytest.mark.parametrize("backend", ["transformers", "ctranslate2"])
def test_output_does_not_depend_on_the_batch(tmp_path, tiny_model, backend, beam, one_thread):
    """Batch sizes 1, 3 and 64 give byte-identical outputs: each sentence's length budget comes
    from its own input (the random model never stops on its own, so every output runs to it);
    greedy outputs are cut to it, beam search decodes equal budgets together."""
    inp = _mixed_stories(tmp_path / "in.txt")
    outs = []
    for bs in (1, 3, 64):
        out = tmp_path / f"ar-{bs}.jsonl"
        args = ["--input", str(inp), "--out", str(out), "--model", str(tiny_model)]
        args += ["--backend", backend, "--ct2-cache", str(tmp_path / "ct2"), "--filters", "none"]
        args += ["--len-ratio", "0.3", "--len-extra", "4", "--batch-size", str(bs)]
        assert _main_translate([*args, "--beam", str(beam)]) == 0
        outs.append(out.read_bytes())
    lengths = {len(r["text"]) for r in read_jsonl(tmp_path / "ar-1.jsonl")}
    assert len(lengths) > 3  # outputs of many lengths: the budgets really differ
    assert outs[0] == outs[1] == outs[2]


def test_a_resume_meets_the_same_batches(tmp_path, tiny_model, monkeypatch, one_thread):
    """Chunks are slices of the shard, not of what is left: a run cut short by --limit (mid-chunk)
    and resumed hands the backend only batches that the uninterrupted run also made, and writes
    the same bytes."""
    from jaxlm.mt import translate as mt
    from jaxlm.mt.backends import BackendConfig
    from jaxlm.mt.filters import FilterConfig

    batches: list[tuple[str, ...]] = []
    real_load = mt.load_backend

    def spying_load(cfg):
        backend = real_load(cfg)
        real_translate = backend.translate

        def translate(sentences):
            batches.append(tuple(sentences))
            return real_translate(sentences)

        backend.translate = translate
        return backend

    monkeypatch.setattr(mt, "load_backend", spying_load)
    inp = _mixed_stories(tmp_path / "in.txt")
    backend = BackendConfig(model=str(tiny_model), len_ratio=0.3, len_extra=4)

    def cfg(out: Path, limit: int = 0) -> mt.TranslateConfig:
        return mt.TranslateConfig(
            inputs=(str(inp),), out=str(out), backend=backend, filters=FilterConfig(enabled=()),
            batch_size=5, chunk_stories=4, limit=limit,
        )  # fmt: skip

    mt.run(cfg(tmp_path / "one.jsonl"))
    whole, batches[:] = set(batches), []
    assert mt.run(cfg(tmp_path / "two.jsonl", limit=3))["todo"] == 3
    assert mt.run(cfg(tmp_path / "two.jsonl", limit=2))["todo"] == 2  # ends mid-chunk again
    assert mt.run(cfg(tmp_path / "two.jsonl"))["todo"] == 7 - 5
    assert set(batches) <= whole and len(batches) > len(whole)  # chunks redone whole
    assert (tmp_path / "two.jsonl").read_bytes() == (tmp_path / "one.jsonl").read_bytes()
    assert all(list(b) == sorted(b, key=lambda t: (len(t), t)) for b in batches)


def test_filters_side_file_and_shard_merge(tmp_path, tiny_model, one_thread):
    from jaxlm.cli import main as jaxlm_main

    def main(argv):
        if argv[0] == "merge":
            return jaxlm_main(["translate-merge", *argv[1:]])
        return jaxlm_main(["translate", *argv])

    inp = tmp_path / "in.txt"
    inp.write_text(_stories(12))
    target = {s.id for s in read_stories([inp])}
    out = tmp_path / "ar.jsonl"
    common = ["--input", str(inp), "--out", str(out), "--model", str(tiny_model), *FAST]
    for shard in ("0/2", "1/2"):
        assert main([*common, "--shard", shard]) == 0  # default filters: random output is rejected
    parts = [tmp_path / f"ar.shard-{i}-of-2.jsonl" for i in range(2)]
    rej = [tmp_path / f"ar.shard-{i}-of-2.rejected.jsonl" for i in range(2)]
    done = {i for p in parts + rej for i in _ids(p)}
    assert done == target
    reasons = {r["reason"] for p in rej for r in read_jsonl(p)}
    assert reasons and reasons <= {
        "empty",
        "repetition",
        "length_ratio",
        "untranslated",
        "wrong_script",
    }
    assert main([*common, "--shard", "0/2"]) == 0  # rejected ids are not retried
    assert {i for p in parts + rej for i in _ids(p)} == target
    merged = tmp_path / "merged.jsonl"
    assert main(["merge", "--out", str(merged), "--input", str(inp), *map(str, parts)]) == 0
    assert set(_ids(merged)) | set(_ids(tmp_path / "merged.rejected.jsonl")) == target
    assert main(["merge", "--out", str(merged), "--input", str(inp), str(parts[0])]) == 2  # missing
    if _ids(parts[0]):
        assert main(["merge", "--out", str(merged), str(parts[0]), str(parts[0])]) == 2  # dup


def test_bench_translate_quick(tmp_path):
    r = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_translate.py"), "--size", "tiny",
         "--sentences", "8", "--new-tokens", "8", "--vocab-size", "0", "--workdir", str(tmp_path)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith('{"size"')]
    assert {x["backend"] for x in rows} == {"transformers", "ctranslate2"}
    assert all(x["sentences_per_s"] > 0 for x in rows)
    assert re.search("cpu", r.stdout)
