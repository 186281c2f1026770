"""Tokenizer on the real data: exact round trip, reserved ids, identical Hugging Face export."""

import pytest

from jaxlm import tokenizer
from jaxlm.data import readers
from jaxlm.data.cleaning import CleanConfig, CleanStats, clean

EXTRA = ["  two  spaces\tand a tab\n\nnew\nline ", "emoji 🙂 漢字 ﻻ", " leading", "x\n", "ـتطويل"]


def _stories(shared_data) -> list[str]:
    en = shared_data / "tinystories_en" / "TinyStories_validation_head.txt"
    ar = shared_data / "arastories" / "Formatted-MSA-prompts-stories-for-fine-tuning.csv"
    raw = list(readers.read(str(en))) + list(
        readers.read(str(ar), options=readers.ReadOptions(field="Story"))
    )
    stats, cfg = CleanStats(), CleanConfig()
    return [s for s in (clean(r, cfg, stats) for r in raw) if s is not None]


@pytest.fixture(scope="session")
def real_tok(shared_data, tmp_path_factory):
    stories = _stories(shared_data)
    tok = tokenizer.train(stories, tmp_path_factory.mktemp("tok"), vocab_size=1000)
    return tok, stories


def test_reserved_ids_and_hash(real_tok):
    tok, _ = real_tok
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.id_to_piece(4) == "<0x00>"
    assert tok.vocab_size == 1000
    assert len(tok.sha256) == 64 and tok.sha256 == tokenizer.Tokenizer.load(tok.path).sha256


def test_round_trip_every_story(real_tok):
    tok, stories = real_tok
    assert len(stories) > 4000
    for text in stories + EXTRA:
        ids = tok.encode(text)
        assert tok.bos_id not in ids and tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(stories + EXTRA) == [tok.encode(t) for t in stories + EXTRA]


def test_hf_export_identical(real_tok, tmp_path):
    from transformers import AutoTokenizer

    tok, stories = real_tok
    out = tokenizer.export_hf(tok.path.parent, tmp_path / "hf")
    for tokdir in (tok.path.parent, out):
        hf = AutoTokenizer.from_pretrained(str(tokdir))
        assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2, 3)
        assert len(hf) == tok.vocab_size
        for text in stories + EXTRA:
            ids = tok.encode(text)
            assert hf(text)["input_ids"] == ids, text[:80]
            assert hf.decode(ids) == text


def test_load_missing_is_user_error(tmp_path):
    from jaxlm.errors import UserError

    with pytest.raises(UserError, match="no tokenizer"):
        tokenizer.Tokenizer.load(tmp_path)


def test_vocab_too_small_is_user_error(tmp_path):
    from jaxlm.errors import UserError

    with pytest.raises(UserError, match="Vocabulary size is smaller") as e:
        tokenizer.train(["abc def"] * 10, tmp_path, vocab_size=100)
    assert "\n" not in str(e.value)
