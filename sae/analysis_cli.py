"""`jaxlm-sae tsea | tsea-compare | dashboard`: thin wrappers over sae.tsea and sae.dashboards.

jaxlm-sae tsea --model M --sae SAEDIR [--tokenizer TOKDIR] [--demo-sets]
    [--names english=FILE[#COLUMN] ...] [--regex NAME=PATTERN ...] --out DIR
jaxlm-sae tsea-compare --before M1 SAE1 --after M2 SAE2 [sets as above] --out DIR
jaxlm-sae dashboard --model M --sae SAEDIR --data DATADIR [--tokenizer TOKDIR]
    --features 0-99 --out DIR
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `tsea`, `tsea-compare` and `dashboard`."""
    p = sub.add_parser("tsea", help="token set enrichment of an SAE's features (JSON + PNG)")
    p.add_argument("--model", required=True, help="model dir, training workdir or HF dir")
    p.add_argument(
        "--sae", required=True, help="SAE directory (cfg.json + sae_weights.safetensors)"
    )
    _set_args(p)
    p.set_defaults(func=cmd_tsea)

    p = sub.add_parser("tsea-compare", help="TSEA of two models' SAEs (e.g. before / after CPT)")
    p.add_argument("--before", nargs=2, required=True, metavar=("MODEL", "SAE"))
    p.add_argument("--after", nargs=2, required=True, metavar=("MODEL", "SAE"))
    _set_args(p)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("dashboard", help="feature dashboards: top contexts, logit tokens (HTML)")
    p.add_argument("--model", required=True)
    p.add_argument("--sae", required=True)
    p.add_argument("--data", required=True, help="prepared DATADIR (`jaxlm data prepare`)")
    p.add_argument("--tokenizer", help="TOKDIR (default: the one the model records)")
    p.add_argument("--features", default="0-99", help="ids and ranges, e.g. 0-99,120")
    p.add_argument("--layer", type=int, help="default: the SAE's hook_layer")
    p.add_argument("--split", default="train")
    p.add_argument("--rows", type=int, default=2048, help="token rows read (at most)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--k", type=int, default=10, help="contexts per feature")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_dashboard)


def _set_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", help="TOKDIR (default: the one the model records)")
    p.add_argument(
        "--names",
        action="append",
        default=[],
        metavar="NAME=FILE[#COLUMN]",
        help="a word-list token set (.txt one per line, or a .tsv/.csv column)",
    )
    p.add_argument("--regex", action="append", default=[], metavar="NAME=PATTERN")
    p.add_argument(
        "--demo-sets", action="store_true", help="the demo corpus' names and dialogue punctuation"
    )
    p.add_argument("--layer", type=int, help="default: the SAE's hook_layer")
    p.add_argument("--cosine-sim", action="store_true")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--correction", choices=("bh", "bonferroni"), default="bh")
    p.add_argument("--top", type=int, default=10, help="features listed per set")
    p.add_argument("--null-directions", type=int, default=256,
                   help="random directions for the null baseline (0: none)")  # fmt: skip
    p.add_argument("--null-quantile", type=float, default=0.99)
    p.add_argument("--out", required=True)


# --- shared steps -------------------------------------------------------------------------------


def _load(model_dir: str, sae_dir: str, tokdir: str | None, layer: int | None):
    from jaxlm.checkpoint import load_model
    from jaxlm.tokenizer import Tokenizer
    from sae.dashboards import load_sae_dir, sae_layer

    sae = load_sae_dir(sae_dir)
    layer = sae_layer(sae.cfg, f"{sae_dir}/cfg.json") if layer is None else layer
    model, info = load_model(model_dir)
    tokdir = tokdir or info.tokenizer
    if tokdir is None:
        raise UserError(f"{model_dir} records no tokenizer; pass --tokenizer")
    tok = Tokenizer.load(tokdir)
    if tok.vocab_size != model.cfg.vocab_size:
        raise UserError(
            f"{tokdir}: {tok.vocab_size} pieces, but {model_dir} has vocab_size "
            f"{model.cfg.vocab_size}"
        )
    if sae.W_dec.shape[1] != model.cfg.d_ff:
        raise UserError(
            f"{sae_dir}: the SAE reads {sae.W_dec.shape[1]} dims; {model_dir}'s MLP has "
            f"{model.cfg.d_ff}"
        )
    return model, sae, layer, tok, tokdir


def _token_sets(args, tok, where: str) -> dict:
    from sae import tsea

    words, regexes = {}, {}
    if args.demo_sets:
        words.update(tsea.demo_word_lists())
        regexes.update({k: tsea.REGEX_SETS[k] for k in tsea.DEMO_REGEX_SETS})
    for spec in args.names:
        name, path, column = tsea.parse_names_spec(spec)
        words[name] = tsea.load_word_list(path, column)
    for spec in args.regex:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise UserError(f"--regex {spec!r}: expected NAME=PATTERN")
        regexes[name] = pattern
    if not words and not regexes:
        raise UserError("no token sets: pass --demo-sets, --names NAME=FILE or --regex NAME=RE")
    return tsea.build_token_sets(tok, words=words, regexes=regexes, where=where)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --- commands -----------------------------------------------------------------------------------


def _analyse(args, model_dir: str, sae_dir: str):
    from sae import tsea

    model, sae, layer, tok, tokdir = _load(model_dir, sae_dir, args.tokenizer, args.layer)
    sets = _token_sets(args, tok, tokdir)
    res = tsea.tsea(model, sae.W_dec, layer, sets, cosine_sim=args.cosine_sim,
                    correction=args.correction, n_null=args.null_directions,
                    null_quantile=args.null_quantile, progress=True)  # fmt: skip
    res.meta.update(model=str(model_dir), sae=str(sae_dir))
    return res, tsea.display_texts(tok)


def _counts(summary_sets: dict, key: str) -> dict:
    return {n: s.get(key) for n, s in summary_sets.items()}


def cmd_tsea(args) -> int:
    from sae import tsea

    res, texts = _analyse(args, args.model, args.sae)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = res.summary(alpha=args.alpha, top=args.top, texts=texts)
    _write_json(out / "tsea.json", summary)
    res.save_npz(out / "tsea.npz")
    tsea.manhattan_plot({"": res}, out / "tsea.png", alpha=args.alpha)
    key = "n_promoting_above_null" if args.null_directions else "n_significant_promoting"
    line = {"out": str(out), "features": res.n_features, key: _counts(summary["sets"], key)}
    print(json.dumps(line, ensure_ascii=False))
    return 0


def cmd_compare(args) -> int:
    from sae import tsea

    (before, texts_b), (after, texts_a) = (
        _analyse(args, *args.before),
        _analyse(args, *args.after),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cmp = tsea.compare(before, after, alpha=args.alpha, top=args.top, texts_before=texts_b,
                       texts_after=texts_a)  # fmt: skip
    _write_json(out / "tsea_compare.json", cmp)
    before.save_npz(out / "tsea_before.npz")
    after.save_npz(out / "tsea_after.npz")
    tsea.manhattan_plot({"before": before, "after": after}, out / "tsea_compare.png",
                        alpha=args.alpha)  # fmt: skip
    key = "n_promoting_above_null" if args.null_directions else "n_significant_promoting"
    change = {n: s["change"].get(key) for n, s in cmp["sets"].items()}
    print(json.dumps({"out": str(out), f"change_in_{key}": change}, ensure_ascii=False))
    return 0


def cmd_dashboard(args) -> int:
    from jaxlm.data.pipeline import read_metadata
    from jaxlm.tokenizer import check_data_tokenizer
    from sae import dashboards as db
    from sae.tsea import display_texts

    model, sae, layer, tok, tokdir = _load(args.model, args.sae, args.tokenizer, args.layer)
    if args.rows < 1 or args.k < 1 or args.batch_size < 1:
        raise UserError("--rows, --k and --batch-size must be >= 1")
    # the examples are decoded with `tok`: data of another tokenizer would show other text
    check_data_tokenizer(
        f"--model {args.model}", tokdir, read_metadata(args.data)["tokenizer"]["sha256"]
    )
    features = db.parse_features(args.features, sae.W_dec.shape[0])
    batches = db.read_rows(
        args.data, split=args.split, max_rows=args.rows, batch_size=args.batch_size
    )
    data = db.dashboards(
        model, sae, layer, batches, features, display_texts(tok), k=args.k, progress=True
    )
    data.update(model=str(args.model), sae=str(args.sae), data=str(args.data))
    j, h = db.write_dashboards(data, args.out, title=f"SAE features: {Path(args.sae).name}")
    print(json.dumps({"json": str(j), "html": str(h), "features": len(features)}))
    return 0
