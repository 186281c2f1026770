"""`prepare` on the real data: exact token accounting, packing, split, atomic output."""

import json

import numpy as np
import pytest
from array_record.python.array_record_data_source import ArrayRecordDataSource

from jaxlm import tokenizer
from jaxlm.data import readers
from jaxlm.data.cleaning import CleanConfig, CleanStats, clean
from jaxlm.data.pipeline import read_metadata
from jaxlm.data.prepare import prepare
from jaxlm.errors import UserError

SEQ = 64


@pytest.fixture(scope="module")
def inputs(shared_data):
    return [
        str(shared_data / "tinystories_en" / "TinyStories_validation_head.txt"),
        str(shared_data / "arastories" / "Formatted-MSA-prompts-stories-for-fine-tuning.csv"),
    ]


@pytest.fixture(scope="module")
def cleaned(inputs):
    stats, cfg, out = CleanStats(), CleanConfig(), []
    for path in inputs:
        for raw in readers.read(path, options=readers.ReadOptions(field="Story")):
            text = clean(raw, cfg, stats)
            if text is not None and text not in out:
                out.append(text)
    return out


@pytest.fixture(scope="module")
def tok(cleaned, tmp_path_factory):
    return tokenizer.train(cleaned, tmp_path_factory.mktemp("tok"), vocab_size=800)


@pytest.fixture(scope="module")
def datadir(inputs, tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("prep") / "data"
    prepare(
        inputs,
        out,
        tokenizer_dir=tok.path.parent,
        seq_len=SEQ,
        val_fraction=0.1,
        read_options=readers.ReadOptions(field="Story"),
        rows_per_shard=1000,
        workers=1,
        progress=False,
    )
    return out


def _rows(datadir, split):
    meta = read_metadata(datadir)
    paths = [str(datadir / s) for s in meta["splits"][split]["shards"]]
    src = ArrayRecordDataSource(paths)
    return np.frombuffer(b"".join(src[i] for i in range(len(src))), np.int32).reshape(-1, SEQ + 1)


def test_token_accounting(datadir, tok, cleaned):
    meta = read_metadata(datadir)
    expected = sum(len(tok.encode(s)) + 1 for s in cleaned)  # + EOS per story
    assert meta["tokens"] == expected and meta["stories"] == len(cleaned)
    assert meta["tokenizer"]["sha256"] == tok.sha256 and meta["seq_len"] == SEQ
    for split, info in meta["splits"].items():
        assert info["rows"] * (SEQ + 1) + info["dropped_tail_tokens"] == info["tokens"]
        assert info["dropped_tail_tokens"] < SEQ + 1
        assert sum(info["rows_per_shard"]) == info["rows"] == len(_rows(datadir, split))
        n = len(info["shards"])
        assert info["shards"][-1] == f"{split}-{n - 1:05d}-of-{n:05d}.arrayrecord"
    assert len(meta["splits"]["train"]["shards"]) > 1
    assert 0.05 < meta["splits"]["validation"]["stories"] / meta["stories"] < 0.15
    assert [s["records"] for s in meta["sources"]] == [meta["cleaning_stats"]["seen"] - 996, 996]


def test_rows_hold_whole_stories_in_order(datadir, tok, cleaned):
    meta, found = read_metadata(datadir), []
    for split in ("train", "validation"):
        stream = _rows(datadir, split).reshape(-1)
        cuts = np.flatnonzero(stream == tok.eos_id)
        pieces = np.split(stream, cuts + 1)[:-1]  # the last piece lost its tail
        found += [tok.decode(p[:-1]) for p in pieces]
        assert len(pieces) in (
            meta["splits"][split]["stories"],
            meta["splits"][split]["stories"] - 1,
        )
    index = {s: i for i, s in enumerate(cleaned)}
    assert all(s in index for s in found)  # every packed story is a cleaned story, decoded exactly
    assert len(found) >= len(cleaned) - 2


def test_same_output_with_workers(inputs, tok, datadir, tmp_path):
    out = tmp_path / "data2"
    prepare(
        inputs,
        out,
        tokenizer_dir=tok.path.parent,
        seq_len=SEQ,
        val_fraction=0.1,
        read_options=readers.ReadOptions(field="Story"),
        rows_per_shard=1000,
        workers=2,
        progress=False,
    )
    a, b = read_metadata(datadir), read_metadata(out)
    assert a["splits"] == b["splits"] and a["cleaning_stats"] == b["cleaning_stats"]
    assert (_rows(datadir, "train") == _rows(out, "train")).all()


def test_failure_leaves_nothing(inputs, tok, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good story\n\nbad \xfe story\n")
    out = tmp_path / "data"
    with pytest.raises(UserError, match=r"bad\.txt:3: undecodable"):
        prepare(
            [inputs[1], str(bad)],
            out,
            tokenizer_dir=tok.path.parent,
            seq_len=SEQ,
            read_options=readers.ReadOptions(field="Story"),
            workers=2,
            progress=False,
        )
    # nothing but the output's lock file (kept and reused: the kernel drops the lock itself)
    assert sorted(tmp_path.iterdir()) == [tmp_path / ".data.lock", bad]
    with pytest.raises(UserError, match="not made by `jaxlm`.*--overwrite"):
        prepare([str(bad)], tmp_path, tokenizer_dir=tok.path.parent, seq_len=SEQ)


def test_metadata_is_json(datadir):
    meta = json.loads((datadir / "metadata.json").read_text())
    assert meta["row_len"] == SEQ + 1 and meta["dtype"] == "int32"
    stats = meta["cleaning_stats"]
    assert "removed_duplicate" in stats and stats["kept"] == meta["stories"]
    assert stats["seen"] == stats["kept"] + sum(v for k, v in stats.items() if "removed" in k)
