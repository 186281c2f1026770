"""Model commands: init, export-hf, import-hf, generate (thin: the work is in the library).

`init`, `import-hf` and `export-hf` write atomic `jaxlm.outputs.Output`s: a model directory
(identity: how it was made) or an export (identity: the source model's, `model_identity`, and the
tokenizer's content hash). A training workdir or another model is never replaced without
`--overwrite`. `generate` and `export-hf` read the model's tokenizer through
`jaxlm.tokenizer.load_recorded`, which refuses one that changed since the model recorded it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxlm.errors import UserError
from jaxlm.outputs import Output, disk_errors, file_fingerprint, say_done


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="save a randomly initialised model")
    p.add_argument(
        "--preset", required=True, help="ts-1m, ts-3m, ts-8m, ts-28m, ts-33m, ts-1l-21m, ts-2l-33m"
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer directory to record with the model")
    p.add_argument("--out", required=True)
    _overwrite(p)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export-hf", help="write config.json + model.safetensors for transformers")
    p.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one the model records)")
    _overwrite(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="turn a transformers GPT-Neo directory into a jaxlm model")
    p.add_argument("--hf", required=True, help="directory written by save_pretrained")
    p.add_argument("--out", required=True)
    _overwrite(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("generate", help="sample a continuation")
    p.add_argument(
        "--checkpoint", required=True, help="model directory, training workdir or HF dir"
    )
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="prompt text (needs a tokenizer)")
    g.add_argument("--prompt-ids", help="comma-separated token ids")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one the model records)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--greedy", action="store_true")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_generate)


def _overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an --out made otherwise")


@contextlib.contextmanager
def _orbax_quiet(tmp: Path) -> Iterator[None]:
    """Orbax logs each failed background write of a save with a traceback, then raises: the
    raised error is what the user sees (a full disk: one line), so its log records about `tmp`
    (the output's temporary sibling) are dropped; after a failure, for good, as its background
    threads may log after the error is raised."""
    log = logging.getLogger("absl")
    where = str(tmp)

    def about_tmp(record: logging.LogRecord) -> bool:
        return where not in record.getMessage()

    log.addFilter(about_tmp)
    yield
    log.removeFilter(about_tmp)


def _output(args, kind: str, identity: dict[str, Any]) -> Output:
    return Output(args.out, kind=kind, identity=identity, overwrite=args.overwrite)


def cmd_init(args) -> int:
    from jaxlm.checkpoint import save_model
    from jaxlm.config import preset
    from jaxlm.model import count_params, init_model
    from jaxlm.tokenizer import tokenizer_sha256

    cfg = preset(args.preset, vocab_size=args.vocab_size)
    sha = tokenizer_sha256(args.tokenizer) if args.tokenizer else None  # a bad one: one line now
    identity = {"made_by": "init", "preset": args.preset, "vocab_size": args.vocab_size,
                "seed": args.seed, "tokenizer_sha256": sha}  # fmt: skip
    with _output(args, "model", identity) as out:
        if out.done:
            say_done(out.path)
            return 0
        model = init_model(cfg, args.seed)
        with disk_errors(out.tmp), _orbax_quiet(out.tmp):
            save_model(out.tmp, model, tokenizer=args.tokenizer, tokenizer_sha256=sha)
        out.publish()
    print(f"saved {args.preset} ({count_params(model):,} parameters) to {out.path}")
    return 0


def cmd_export(args) -> int:
    from jaxlm.checkpoint import load_model, model_identity
    from jaxlm.hf import save_hf
    from jaxlm.tokenizer import export_hf, load_recorded, tokenizer_sha256

    source = model_identity(args.checkpoint)  # no weights read yet
    tok_sha = tokenizer_sha256(args.tokenizer) if args.tokenizer else source.get(
        "tokenizer_sha256")  # fmt: skip
    with _output(args, "hf-export", {"model": source, "tokenizer_sha256": tok_sha}) as out:
        if out.done:
            say_done(out.path)
            return 0
        model, info = load_model(args.checkpoint)
        tok = load_recorded(info, args.tokenizer, vocab_size=model.cfg.vocab_size)
        if tok is not None:
            ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
        else:  # a Hugging Face source's ids, kept by `import-hf` too
            ids = info.hf_token_ids or {}
        with disk_errors(out.tmp):
            save_hf(model, out.tmp, **ids)
        if tok is not None:
            tok_dir = args.tokenizer or info.tokenizer
            assert tok_dir is not None  # load_recorded returns a tokenizer only from one of these
            export_hf(tok_dir, out.tmp)
            src = Path(tok_dir) if Path(tok_dir).is_dir() else tok.path.parent
            shutil.copytree(src, out.tmp / "jaxlm_tokenizer", dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns("identity.json"))  # fmt: skip
        out.publish()
    step = f" (step {info.step})" if info.step is not None else ""
    print(f"exported {info.path}{step} to {out.path}" + (" with its tokenizer" if tok else ""))
    return 0


def cmd_import(args) -> int:
    from jaxlm.checkpoint import save_model
    from jaxlm.hf import load_hf, token_ids

    d = Path(args.hf)
    if not d.is_dir():
        raise UserError(f"--hf {d}: no such directory")
    files = [d / "config.json", *sorted(d.glob("*.safetensors")), d / "pytorch_model.bin"]
    identity = {"made_by": "import-hf", "files": [file_fingerprint(f) for f in files
                                                  if f.is_file()]}  # fmt: skip
    with _output(args, "model", identity) as out:
        if out.done:
            say_done(out.path)
            return 0
        model = load_hf(d)
        tok = str(d / "jaxlm_tokenizer") if (d / "jaxlm_tokenizer").is_dir() else None
        with disk_errors(out.tmp), _orbax_quiet(out.tmp):
            save_model(out.tmp, model, tokenizer=tok, hf_token_ids=token_ids(d))
        out.publish()
    print(f"imported {d} to {out.path}")
    return 0


def cmd_generate(args) -> int:
    from jaxlm.checkpoint import load_model
    from jaxlm.generate import SamplingConfig, generate
    from jaxlm.tokenizer import load_recorded

    model, info = load_model(args.checkpoint)
    tok = load_recorded(info, args.tokenizer, vocab_size=model.cfg.vocab_size)
    if args.prompt is not None:
        if tok is None:
            raise UserError("--prompt needs a tokenizer: pass --tokenizer or use --prompt-ids")
        # Training rows separate stories with EOS only, so a story starts right after an EOS.
        prompt = [tok.eos_id] + tok.encode(args.prompt)
    else:
        try:
            prompt = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UserError(
                f"--prompt-ids {args.prompt_ids!r}: expected integers like 1,2,3"
            ) from None
    sampling = SamplingConfig(args.greedy, args.temperature, args.top_k, args.top_p)
    eos = tok.eos_id if tok is not None else None
    (new,) = generate(
        model,
        [prompt],
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.seed,
        eos_id=eos,
    )
    text = tok.decode([t for t in new if t != eos]) if tok is not None else None
    if args.json:
        out: dict[str, object] = {"token_ids": new}
        if text is not None:
            out["text"] = text
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(text if text is not None else " ".join(map(str, new)))
    sys.stdout.flush()
    return 0
