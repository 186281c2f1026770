"""SentencePiece BPE tokenizer (train, load, encode, decode) and its Hugging Face export.

Reserved ids: pad=0 (`<pad>`), unk=1 (`<unk>`), bos=2 (`<s>`), eos=3 (`</s>`), then the 256 byte
pieces `<0x00>`..`<0xFF>` (byte fallback: no text is ever unknown), then the learned pieces.

SentencePiece normally rewrites text (NFKC, collapsing spaces, a dummy leading space) so that
decode(encode(x)) != x. Here normalisation is the cleaning step's job, so the trainer runs with the
`identity` rule, keeps every space and newline, and adds no dummy prefix: decode(encode(x)) == x
for any cleaned story. The HF export (`tokenizer.json`, a `tokenizers` BPE with byte fallback built
from the same pieces and merge order) gives the same ids and the same decoded text.

A TOKDIR holds `spm.model` (the source of truth; the same sample and settings give the same bytes,
wherever it is trained), `tokenizer.json`, `tokenizer_config.json`,
`special_tokens_map.json` (so `AutoTokenizer.from_pretrained(TOKDIR)` works) and `jaxlm.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal, overload

from jaxlm.errors import UserError

_CACHE_SIZE = 1 << 19  # words per cache: bounds a worker's memory (~100 MB)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
MODEL_FILE = "spm.model"


def check_data_tokenizer(what: str, tokdir: str | None, data_sha: str) -> None:
    """A model (`what`, e.g. "--init-from DIR") must read data tokenised with its own tokenizer:
    other ids would be trained on, or decoded, silently wrong. An unknown tokenizer warns."""
    try:
        sha = Tokenizer.load(tokdir).sha256 if tokdir else None
    except (UserError, OSError):
        sha = None
    if sha is None:
        logging.getLogger("jaxlm").warning(
            "%s: its tokenizer is unknown; make sure the data uses it", what
        )
    elif sha != data_sha:
        raise UserError(
            f"{what}: its tokenizer ({tokdir}) is not the one the data was tokenised with; "
            "prepare the data with the model's tokenizer"
        )


def train(
    stories: Iterable[str],
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    sample_size: int = 200_000,
    seed: int = 0,
    max_chars: int = 100_000,
) -> Tokenizer:
    """Trains a BPE tokenizer on a reservoir sample of `sample_size` stories and writes TOKDIR."""

    sample = reservoir_sample(stories, sample_size, seed)
    if not sample:
        raise UserError("no stories to train the tokenizer on")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        _train_spm(sample, out, vocab_size, max_chars)
    except RuntimeError as e:  # e.g. a vocabulary smaller than the sample's characters
        msg = str(e).strip().splitlines()[-1]
        raise UserError(f"sentencepiece could not train (vocab size {vocab_size}): {msg}") from None
    try:
        export_hf(out, out)
        hf_files = True
    except ImportError:  # the `hf` extra (transformers, tokenizers) is not installed
        hf_files = False
    tok = Tokenizer.load(out)
    info = {"vocab_size": tok.vocab_size, "sample_stories": len(sample), "sha256": tok.sha256,
            "hf_files": hf_files}  # fmt: skip
    (out / "jaxlm.json").write_text(json.dumps(info, indent=2) + "\n")
    return tok


def _train_spm(sample: list[str], out: Path, vocab_size: int, max_chars: int) -> None:
    """Writes `out/spm.model`. The model goes through a buffer, not a `model_prefix`: a prefix is
    recorded inside the model, so the same training in another folder (or the temporary folder of
    an atomic output) would give other bytes and another sha256."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample),
        model_writer=buf,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small sample may not support the full vocabulary
        byte_fallback=True,
        character_coverage=0.9999,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_digits=True,
        max_sentence_length=4 * max_chars,
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        pad_piece=PAD,
        unk_piece=UNK,
        bos_piece=BOS,
        eos_piece=EOS,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    (out / MODEL_FILE).write_bytes(buf.getvalue())


def reservoir_sample(items: Iterable[str], k: int, seed: int) -> list[str]:
    """A uniform sample of at most `k` items from a stream, in O(k) memory (Algorithm R)."""
    rng = random.Random(seed)
    sample: list[str] = []
    for i, item in enumerate(items):
        if i < k:
            sample.append(item)
        else:
            j = rng.randrange(i + 1)
            if j < k:
                sample[j] = item
    return sample


def model_file(tokdir: str | os.PathLike) -> Path:
    """The SentencePiece model of TOKDIR (its `spm.model`), or TOKDIR itself when it is a file;
    one line when there is none."""
    path = Path(tokdir)
    path = path / MODEL_FILE if path.is_dir() else path
    if not path.is_file():
        raise UserError(f"no tokenizer at {tokdir} (expected {path}); run `jaxlm tokenizer train`")
    return path


def tokenizer_sha256(tokdir: str | os.PathLike) -> str:
    """The content hash of TOKDIR's model file: what ties data and models to a tokenizer."""
    return hashlib.sha256(model_file(tokdir).read_bytes()).hexdigest()


@overload
def load_recorded(
    info, tokdir: str | os.PathLike | None = None, *, vocab_size: int | None = None,
    required: Literal[True],
) -> Tokenizer: ...  # fmt: skip


@overload
def load_recorded(
    info, tokdir: str | os.PathLike | None = None, *, vocab_size: int | None = None,
    required: bool = False,
) -> Tokenizer | None: ...  # fmt: skip


def load_recorded(
    info, tokdir: str | os.PathLike | None = None, *, vocab_size: int | None = None,
    required: bool = False,
) -> Tokenizer | None:  # fmt: skip
    """The tokenizer to read and write a model's ids with: `tokdir` (a `--tokenizer` flag) or
    the one the model records (`info`: a `jaxlm.checkpoint.ModelInfo`), checked by content.

    A model records its tokenizer's sha256 when it is saved; a tokenizer whose model file has
    another hash (retrained into the same folder, or another one passed) would turn the model's
    ids into wrong text, or index past its pieces: refused in one line. So is one with more
    pieces than the model's `vocab_size`. A model saved before hashes were recorded is read with
    a warning. None when there is no tokenizer (`required`: one line asking for --tokenizer).
    """
    path = tokdir or info.tokenizer
    if path is None:
        if required:
            raise UserError(f"{info.path} records no tokenizer; pass --tokenizer")
        return None
    if tokdir is None and not Path(path).exists():
        raise UserError(f"{info.path} records the tokenizer {path}, which is gone (moved?); "
                        "pass --tokenizer with the model's own")  # fmt: skip
    tok = Tokenizer.load(path)
    want = info.tokenizer_sha256
    if want and tok.sha256 != want:
        change = f"sha256 {want[:12]}... recorded, {tok.sha256[:12]}... now"
        if tokdir is None or Path(tokdir).resolve() == Path(info.tokenizer or "").resolve():
            raise UserError(f"{path}: this tokenizer changed since {info.path} recorded it "
                            f"({change}): the model's ids would decode wrongly; restore it, or "
                            "pass --tokenizer with the model's own")  # fmt: skip
        raise UserError(f"--tokenizer {tokdir} is not the tokenizer {info.path} was trained with "
                        f"({change}): the model's ids would decode wrongly")  # fmt: skip
    if want is None and info.source != "hf":
        logging.getLogger("jaxlm").warning(
            "%s records no tokenizer hash (saved by an older jaxlm): %s is not checked", info.path,
            path,
        )  # fmt: skip
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise UserError(f"{path}: {tok.vocab_size} pieces, but {info.path} has vocab_size "
                        f"{vocab_size}: not this model's tokenizer")  # fmt: skip
    return tok


class Tokenizer:
    """A trained SentencePiece model; `encode` adds no bos/eos."""

    def __init__(self, model_path: str | os.PathLike):
        import sentencepiece as spm

        self.path = Path(model_path)
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:  # not a model file, or a damaged one
            msg = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise UserError(f"{self.path}: not a SentencePiece model ({msg})") from None
        self._cache_first: dict[str, list[int]] = {}  # a text's first word
        self._cache_rest: dict[str, list[int]] = {}  # later words, keyed without their space

    @classmethod
    def load(cls, tokdir: str | os.PathLike) -> Tokenizer:
        """Loads TOKDIR (a directory written by `train`) or a `.model` file."""
        return cls(model_file(tokdir))

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Same ids as `encode`, faster: words are encoded once and cached.

        No learned piece holds a space except as its first character (split_by_whitespace), so
        no merge crosses the boundary before a space: encoding the text piecewise, cut before
        each space, gives exactly the ids of encoding it whole.
        """
        words = [t.split(" ") for t in texts]  # "a  b" -> ["a", "", "b"]: "a", " ", " b"
        first, rest = self._cache_first, self._cache_rest
        if len(rest) > _CACHE_SIZE:
            first.clear()
            rest.clear()
        new_first = list({w[0] for w in words if w[0] not in first})
        new_rest = list({x for w in words for x in w[1:] if x not in rest})
        first.update(zip(new_first, self._sp.encode(new_first), strict=True))
        enc = self._sp.encode([" " + x for x in new_rest])
        rest.update(zip(new_rest, enc, strict=True))
        out = []
        for w in words:
            ids = list(first[w[0]])
            for x in w[1:]:
                ids += rest[x]
            out.append(ids)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(map(int, ids)))

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    pad_id = property(lambda self: PAD_ID)
    unk_id = property(lambda self: UNK_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)

    @property
    def sha256(self) -> str:
        """Hash of the model file: ties prepared data and checkpoints to this tokenizer."""
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def _vocab_and_merges(model_path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Pieces -> ids, and every (left, right) split of a learned piece, in SentencePiece's order.

    SentencePiece BPE repeatedly merges the adjacent pair whose joined piece scores highest; the
    learned pieces are stored best first, so ranking merges by the joined piece's id reproduces it.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_path))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    merges = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return vocab, [(m[3], m[4]) for m in merges]


def export_hf(tokdir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Writes the HF tokenizer files for TOKDIR into `out_dir` (AutoTokenizer-loadable)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.load(tokdir)
    vocab, merges = _vocab_and_merges(tok.path)
    bpe = models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True)
    hf = HFTokenizer(bpe)
    hf.normalizer = normalizers.Replace(" ", "\u2581")
    hf.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=hf,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        clean_up_tokenization_spaces=False,
        add_bos_token=False,
        add_eos_token=False,
        model_max_length=int(1e9),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    return out
