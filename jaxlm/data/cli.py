"""`jaxlm tokenizer train` and `jaxlm data {prepare,demo-corpus}`: thin wrappers.

Each writes an atomic `jaxlm.outputs.Output` (a TOKDIR, a DATADIR, a JSON Lines file): two runs
on one output are refused, a rerun with the same settings finds it done and says so, one with
other settings is refused naming them unless `--overwrite`.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from collections.abc import Iterator

from jaxlm.data import readers
from jaxlm.data.cleaning import CleanConfig, CleanStats, clean
from jaxlm.errors import UserError


def register(subparsers) -> None:
    """Adds the `tokenizer` and `data` commands."""
    tok = subparsers.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer")
    tok_sub = tok.add_subparsers(dest="tokenizer_command", required=True)
    train = tok_sub.add_parser("train", help="train on a streamed sample of stories")
    _add_input_args(train)
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--sample-size", type=int, default=200_000, help="stories sampled (cap)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--overwrite", action="store_true", help="replace a TOKDIR made otherwise")
    train.add_argument("--out", required=True, help="TOKDIR to write")
    train.set_defaults(func=_tokenizer_train)

    data = subparsers.add_parser("data", help="prepare packed training data; demo corpus")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    prep = data_sub.add_parser("prepare", help="clean, tokenise, pack into ArrayRecord shards")
    _add_input_args(prep)
    prep.add_argument("--tokenizer", required=True, help="TOKDIR from `jaxlm tokenizer train`")
    prep.add_argument("--seq-len", type=int, required=True)
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--rows-per-shard", type=int, default=65536)
    prep.add_argument("--workers", type=int, default=None, help="default: all cores")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing DATADIR")
    prep.add_argument("--out", required=True, help="DATADIR to write")
    prep.set_defaults(func=_data_prepare)

    demo = data_sub.add_parser("demo-corpus", help="write built-in Arabic demo stories (JSONL)")
    demo.add_argument("--style", choices=("native", "translated"), required=True)
    demo.add_argument("--n", type=int, default=10_000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--english-name-share", type=float, default=1.0, metavar="P",
                      help="translated style: each character's chance of an English name, else "
                      "an Arabic one (below 1, a pretrained English-name rate a causal check "
                      "can move)")  # fmt: skip
    demo.add_argument("--overwrite", action="store_true", help="replace a file made otherwise")
    demo.add_argument("--out", required=True, help="FILE.jsonl")
    demo.set_defaults(func=_demo_corpus)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", required=True, help="file or dataset; repeatable")
    p.add_argument("--format", default="auto", choices=readers.formats())
    p.add_argument("--field", default="text", help="JSONL field / CSV or Parquet column")
    p.add_argument("--split", default="train", help="split for --format hf/tfds")
    p.add_argument("--txt-separator", default="auto", choices=("auto", "eot", "blank"))
    p.add_argument("--no-fix-mojibake", action="store_true")
    p.add_argument("--unicode-form", default="NFKC", choices=("NFKC", "NFC", "none"))
    p.add_argument("--keep-tatweel", action="store_true")
    p.add_argument("--remove-diacritics", action="store_true")
    p.add_argument("--no-whitespace", action="store_true", help="keep whitespace as is")
    p.add_argument("--no-dedup", action="store_true")
    p.add_argument("--min-chars", type=int, default=1)
    p.add_argument("--max-chars", type=int, default=100_000)


def _options(args) -> tuple[readers.ReadOptions, CleanConfig]:
    read = readers.ReadOptions(field=args.field, split=args.split, txt_separator=args.txt_separator)
    cfg = CleanConfig(
        fix_mojibake=not args.no_fix_mojibake,
        unicode_form=args.unicode_form,
        remove_tatweel=not args.keep_tatweel,
        remove_diacritics=args.remove_diacritics,
        whitespace=not args.no_whitespace,
        dedup=not args.no_dedup,
        min_chars=args.min_chars,
        max_chars=args.max_chars,
    )
    return read, cfg


def cleaned_stories(inputs, fmt, read: readers.ReadOptions, cfg: CleanConfig, stats: CleanStats):
    """All cleaned stories of `inputs`, in order (no de-duplication)."""
    streams = (readers.read(p, fmt, read) for p in inputs)
    for text in itertools.chain.from_iterable(streams):
        out = clean(text, cfg, stats)
        if out is not None:
            yield out


def _tokenizer_train(args) -> int:
    """A TOKDIR is identified by its inputs, their reading and cleaning, and the sampling and
    vocabulary settings: retraining into a TOKDIR made otherwise is refused (models and data
    record it by content hash: a new one would make their ids decode wrongly)."""
    from jaxlm import tokenizer
    from jaxlm.outputs import Output, say_done

    read, cfg = _options(args)
    identity = {"inputs": readers.inputs_identity(args.input, args.format),
                "read": dataclasses.asdict(read), "cleaning": dataclasses.asdict(cfg),
                "vocab_size": args.vocab_size, "sample_size": args.sample_size,
                "seed": args.seed}  # fmt: skip
    with Output(args.out, kind="tokenizer", identity=identity, overwrite=args.overwrite) as out:
        stats = CleanStats()
        if out.done:
            say_done(out.path)
            tok = tokenizer.Tokenizer.load(out.path)
        else:
            stories = cleaned_stories(args.input, args.format, read, cfg, stats)
            tok = tokenizer.train(stories, out.tmp, vocab_size=args.vocab_size,
                                  sample_size=args.sample_size, seed=args.seed,
                                  max_chars=cfg.max_chars)  # fmt: skip
        summary = {"tokdir": args.out, "vocab_size": tok.vocab_size, "sha256": tok.sha256,
                   "cleaning_stats": stats.report()}  # fmt: skip
        if not out.done:
            out.publish()
    print(json.dumps(summary | {"already_done": out.done}, ensure_ascii=False))
    return 0


def _data_prepare(args) -> int:
    from jaxlm.data.prepare import prepare
    from jaxlm.outputs import say_done

    read, cfg = _options(args)
    meta = prepare(args.input, args.out, tokenizer_dir=args.tokenizer, seq_len=args.seq_len,
                   fmt=args.format, read_options=read, clean_cfg=cfg,
                   val_fraction=args.val_fraction, rows_per_shard=args.rows_per_shard,
                   workers=args.workers, overwrite=args.overwrite)  # fmt: skip
    if meta.get("already_done"):
        say_done(args.out)
    summary = {k: meta[k] for k in ("stories", "tokens", "cleaning_stats")}
    summary["rows"] = {s: v["rows"] for s, v in meta["splits"].items()}
    summary["already_done"] = bool(meta.get("already_done"))
    print(json.dumps({"datadir": args.out, **summary}, ensure_ascii=False))
    return 0


def _demo_corpus(args) -> int:
    """The identity gains `english_name_share` only when it is not 1.0: a file written before the
    option existed (the same stories) is then still found done, not "made with other settings"."""
    from jaxlm.data.demo_corpus import story
    from jaxlm.outputs import Output, say_done

    share = args.english_name_share
    if not 0.0 <= share <= 1.0:
        raise UserError(f"--english-name-share {share}: must be in [0, 1]")
    if args.style == "native" and share != 1.0:
        raise UserError("--english-name-share applies to --style translated only "
                        "(native stories have Arabic names)")  # fmt: skip
    chosen = {} if share == 1.0 else {"english_name_share": share}
    identity = {"style": args.style, "n": args.n, "seed": args.seed, **chosen}
    with Output(args.out, kind="demo-corpus", identity=identity, directory=False,
                overwrite=args.overwrite) as out:  # fmt: skip
        if out.done:
            say_done(out.path)
        else:
            with open(out.tmp, "w", encoding="utf-8") as f:
                stories = (story(args.style, i, args.seed, share) for i in range(args.n))
                for line in _jsonl(stories):
                    f.write(line)
            out.publish()
    print(json.dumps({"out": args.out, "style": args.style, "n": args.n, "seed": args.seed,
                      **chosen, "already_done": out.done}))  # fmt: skip
    return 0


def _jsonl(texts) -> Iterator[str]:
    for t in texts:
        yield json.dumps({"text": t}, ensure_ascii=False) + "\n"
