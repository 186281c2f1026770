"""Readers for each format, cleaning steps and their counts, and every bad-input case."""

import json
import sys

import pytest

from jaxlm import cli
from jaxlm.data import readers
from jaxlm.data.cleaning import CleanConfig, CleanStats, clean
from jaxlm.errors import UserError

R = readers.ReadOptions


def _read(path, fmt="auto", **kw):
    return list(readers.read(str(path), fmt, R(**kw)))


def test_txt_eot_and_blank(tmp_path):
    eot = tmp_path / "a.txt"
    eot.write_text("One.\nTwo lines.\n<|endoftext|>\nSecond story.\n<|endoftext|>\n")
    assert [s.strip() for s in _read(eot) if s.strip()] == ["One.\nTwo lines.", "Second story."]
    blank = tmp_path / "b.txt"
    blank.write_text("First para.\nstill first\n\n\nSecond.\n")
    assert _read(blank) == ["First para.\nstill first\n", "Second.\n"]


def test_jsonl_field_flag(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a", "story": "x"}\n\n{"text": "b", "story": "y"}\n')
    assert _read(p) == ["a", "b"]
    assert _read(p, field="story") == ["x", "y"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "a.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "text": ["قصة", "two", "three"]}), p)
    assert _read(p) == ["قصة", "two", "three"]
    with pytest.raises(UserError, match=r"a\.parquet: missing column 'story'"):
        _read(p, field="story")
    with pytest.raises(UserError, match=r"a\.parquet: column 'id' is int64, not text"):
        _read(p, field="id")


def test_csv_multiline(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(',Prompt,Story\n0,p,"line one\nline ""two"""\n1,q,short\n', encoding="utf-8")
    assert _read(p, field="Story") == ['line one\nline "two"', "short"]


def test_arastories_csv(shared_data):
    path = shared_data / "arastories" / "Formatted-MSA-prompts-stories-for-fine-tuning.csv"
    stories = _read(path, field="Story")
    assert len(stories) == 996
    assert all(s.strip() for s in stories) and any("\n" in s for s in stories)


def test_tinystories_text(shared_data):
    stories = _read(shared_data / "tinystories_en" / "TinyStories_validation_head.txt")
    assert len(stories) > 3000  # blank-line blocks (stories and paragraphs)
    stats, cfg = CleanStats(), CleanConfig()
    cleaned = [clean(s, cfg, stats) for s in stories]
    assert stats["fixed_mojibake"] > 50
    assert not any("â€" in c for c in cleaned if c)


def test_auto_and_unknown_format(tmp_path):
    assert readers.resolve_format("x/y.JSONL") == "jsonl"
    assert readers.resolve_format("y.csv") == "csv"
    with pytest.raises(UserError, match="cannot tell the format of y.xml"):
        readers.resolve_format("y.xml")
    with pytest.raises(UserError, match="unknown format 'xml'"):
        readers.resolve_format("y.txt", "xml")


@pytest.mark.parametrize(
    ("fmt", "extra", "module"), [("hf", "hf", "datasets"), ("tfds", "tfds", "tensorflow_datasets")]
)
def test_optional_backends_clean_error(monkeypatch, fmt, extra, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(UserError, match=rf"pip install 'jaxlm\[{extra}\]'") as e:
        _read("roneneldan/TinyStories", fmt)
    assert "\n" not in str(e.value)


def test_undecodable_bytes(tmp_path):
    for name in ("a.txt", "a.jsonl"):
        p = tmp_path / name
        p.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff here"}\n')
        with pytest.raises(UserError, match=rf"{name}:2: undecodable bytes"):
            _read(p)
    p = tmp_path / "a.csv"
    p.write_bytes(b"text\n" + b"ok\n" * 3000 + b"bad \xff\n")  # past the first read buffer
    with pytest.raises(UserError, match=r"a\.csv:3002: undecodable bytes"):
        _read(p)


def test_a_byte_order_mark_is_not_text(tmp_path):
    bom = "\ufeff"
    for name, text, want in (("a.txt", "one\n\ntwo\n", ["one\n", "two\n"]),
                             ("a.jsonl", '{"text": "one"}\n', ["one"]),
                             ("a.csv", "text,x\none,1\n", ["one"])):  # fmt: skip
        p = tmp_path / name
        p.write_text(bom + text, encoding="utf-8")
        assert _read(p) == want, name


def test_missing_field_or_column(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(UserError, match=r"a\.jsonl:2: missing field 'text'"):
        _read(p)
    c = tmp_path / "a.csv"
    c.write_text(",Prompt,Story\n0,p,s\n")
    with pytest.raises(UserError, match=r"a\.csv: missing column 'text'"):
        _read(c)


def test_empty_input(tmp_path):
    for name in ("e.txt", "e.jsonl", "e.csv"):
        (tmp_path / name).write_text("")
        with pytest.raises(UserError, match=rf"{name}: empty input"):
            _read(tmp_path / name)
    with pytest.raises(UserError, match="input file not found"):
        _read(tmp_path / "missing.txt")


def test_empty_and_huge_records_are_counted(tmp_path):
    p = tmp_path / "a.jsonl"
    huge = "x" * 10_000_000
    rows = [{"text": "fine story"}, {"text": ""}, {"text": "  \n "}, {"text": huge}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats, cfg = CleanStats(), CleanConfig()
    kept = [c for c in (clean(s, cfg, stats) for s in _read(p)) if c is not None]
    assert kept == ["fine story"]
    assert stats["removed_empty"] == 2 and stats["removed_too_long"] == 1
    assert stats["seen"] == 4


def test_cleaning_steps():
    stats = CleanStats()
    cfg = CleanConfig(remove_diacritics=True, min_chars=5)
    assert (
        clean("Lily said, â€œHi!â€ to Ben’s dog.", cfg, stats) == "Lily said, “Hi!” to Ben’s dog."
    )
    assert clean("قالــت  سَلْمى:\t«مرحبا»\r\n\n\n\nﻻ", cfg, stats) == "قالت سلمى: «مرحبا»\n\nلا"
    assert clean("abc", cfg, stats) is None
    assert stats["fixed_mojibake"] == 1 and stats["tatweel"] == 1 and stats["diacritics"] == 1
    assert stats["changed_unicode_form"] == 1 and stats["removed_too_short"] == 1
    assert clean("ـمَ", CleanConfig(remove_tatweel=False, unicode_form="NFC"), stats) == "ـمَ"


def _main(argv, monkeypatch):
    monkeypatch.setattr(cli, "_COMMAND_MODULES", ("jaxlm.data.cli",))
    return cli.main(argv)


def test_cli_errors_are_one_line(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    argv = ["tokenizer", "train", "--input", str(bad), "--out", str(tmp_path / "tok")]
    assert _main(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.jsonl:1: missing field 'text'" in err
    argv = [
        "data",
        "prepare",
        "--input",
        str(tmp_path / "x.xml"),
        "--tokenizer",
        str(tmp_path),
        "--seq-len",
        "8",
        "--out",
        str(tmp_path / "d"),
    ]
    assert _main(argv, monkeypatch) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no tokenizer" in err


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    corpus, tok, data = tmp_path / "c.jsonl", tmp_path / "tok", tmp_path / "data"
    run = lambda *a: _main(list(a), monkeypatch)
    assert (
        run("data", "demo-corpus", "--style", "translated", "--n", "200", "--out", str(corpus)) == 0
    )
    assert (
        run(
            "tokenizer",
            "train",
            "--input",
            str(corpus),
            "--vocab-size",
            "500",
            "--sample-size",
            "100",
            "--out",
            str(tok),
        )
        == 0
    )
    assert (
        run(
            "data",
            "prepare",
            "--input",
            str(corpus),
            "--input",
            str(corpus),
            "--tokenizer",
            str(tok),
            "--seq-len",
            "32",
            "--workers",
            "1",
            "--out",
            str(data),
        )
        == 0
    )
    meta = json.loads((data / "metadata.json").read_text())
    assert meta["stories"] == 200 and meta["cleaning_stats"]["removed_duplicate"] == 200
    assert len(meta["sources"]) == 2


def test_corrupt_parquet(tmp_path):
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"not parquet at all")
    with pytest.raises(UserError, match=r"bad\.parquet: not a readable Parquet file"):
        _read(p)
