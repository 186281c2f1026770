"""Model commands: init, export-hf, import-hf, generate (thin: the work is in the library)."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="save a randomly initialised model")
    p.add_argument(
        "--preset", required=True, help="ts-1m, ts-3m, ts-8m, ts-28m, ts-33m, ts-1l-21m, ts-2l-33m"
    )
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", help="tokenizer directory to record with the model")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("export-hf", help="write config.json + model.safetensors for transformers")
    p.add_argument("--checkpoint", required=True, help="model directory or training workdir")
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one the model records)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import-hf", help="turn a transformers GPT-Neo directory into a jaxlm model")
    p.add_argument("--hf", required=True, help="directory written by save_pretrained")
    p.add_argument("--out", required=True)
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


def cmd_init(args) -> int:
    from jaxlm.checkpoint import save_model
    from jaxlm.config import preset
    from jaxlm.model import count_params, init_model

    model = init_model(preset(args.preset, vocab_size=args.vocab_size), args.seed)
    out = save_model(args.out, model, tokenizer=args.tokenizer)
    print(f"saved {args.preset} ({count_params(model):,} parameters) to {out}")
    return 0


def _tokenizer(path: str | None):
    if not path:
        return None
    from jaxlm.tokenizer import Tokenizer

    return Tokenizer.load(path)


def cmd_export(args) -> int:
    from jaxlm.checkpoint import load_model
    from jaxlm.hf import save_hf

    model, info = load_model(args.checkpoint)
    tok_dir = args.tokenizer or info.tokenizer
    tok = _tokenizer(tok_dir)
    if tok is not None:
        ids = {"bos_id": tok.bos_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id}
    else:  # a Hugging Face source's ids, kept by `import-hf` too
        ids = info.hf_token_ids or {}
    out = save_hf(model, args.out, **ids)
    if tok is not None:
        from jaxlm.tokenizer import export_hf

        export_hf(tok_dir, out)
        shutil.copytree(tok_dir, out / "jaxlm_tokenizer", dirs_exist_ok=True)
    step = f" (step {info.step})" if info.step is not None else ""
    print(f"exported {info.path}{step} to {out}" + (" with its tokenizer" if tok else ""))
    return 0


def cmd_import(args) -> int:
    from jaxlm.checkpoint import save_model
    from jaxlm.hf import load_hf, token_ids

    d = Path(args.hf)
    model = load_hf(d)
    tok = str(d / "jaxlm_tokenizer") if (d / "jaxlm_tokenizer").is_dir() else None
    out = save_model(args.out, model, tokenizer=tok, hf_token_ids=token_ids(d))
    print(f"imported {d} to {out}")
    return 0


def cmd_generate(args) -> int:
    from jaxlm.checkpoint import load_model
    from jaxlm.generate import SamplingConfig, generate

    model, info = load_model(args.checkpoint)
    tok = _tokenizer(args.tokenizer or info.tokenizer)
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
        out = {"token_ids": new}
        if text is not None:
            out["text"] = text
        print(json.dumps(out, ensure_ascii=False))
    else:
        print(text if text is not None else " ".join(map(str, new)))
    sys.stdout.flush()
    return 0
