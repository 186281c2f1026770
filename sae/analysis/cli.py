"""`jaxlm sae tsea | tsea-compare | dashboard | attribute | match`: thin wrappers over sae.analysis.

jaxlm sae tsea --model M --sae SAEDIR [--tokenizer TOKDIR] [--demo-sets]
    [--names english=FILE[#COLUMN] ...] [--regex NAME=PATTERN ...] [--contrast A:B ...]
    [--data DATADIR ...] --out DIR
jaxlm sae tsea-compare --before M1 SAE1 --after M2 SAE2 [sets as above]
    [--attribution-before DIR --attribution-after DIR] --out DIR
jaxlm sae dashboard --model M --sae SAEDIR --data DATADIR [--tokenizer TOKDIR]
    --features 0-99 --out DIR
jaxlm sae attribute --model M --sae SAEDIR --data DATADIR [--data ...]
    [--names english=FILE --names arabic=FILE] [--dashboards] --out DIR
jaxlm sae match --before M1 SAE1 --after M2 SAE2 --data DATADIR [...] [--names ...]
    [--attribution-before DIR --attribution-after DIR] --out DIR

Each --out is an atomic `jaxlm.outputs.Output` (`_output`): identified by its models, SAEs, data,
tokenizer and word lists (by content or fingerprint) and every other flag; a rerun with the same
finds it done, one with others is refused unless --overwrite, two at once are refused. The model's
tokenizer is checked against the hash the model recorded (`jaxlm.tokenizer.load_recorded`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from jaxlm.errors import UserError
from jaxlm.eval.wordlists import word_lists

if TYPE_CHECKING:  # numpy is imported where it is used: the CLI starts without it
    import numpy as np


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
    _saved_args(p, "--data rows (the features' liveness and firing frequency)")
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
    _overwrite_arg(p)
    p.set_defaults(func=cmd_dashboard)

    p = sub.add_parser("attribute", help="exact per-feature attribution of an MLP layer's direct "
                       "push toward English vs Arabic names and dialogue (JSON + PNG)")  # fmt: skip
    p.add_argument("--model", required=True)
    p.add_argument("--sae", action="append", required=True,
                   help="SAE_DIR; repeated (SAEs of several layers of the model): one pass "
                   "serves them all and each writes OUT/layer-N, as --sae it --out OUT/layer-N "
                   "would")  # fmt: skip
    _attribution_args(p)
    p.add_argument("--dashboards", action="store_true",
                   help="also write the listed features' dashboards (DIR/dashboards)")  # fmt: skip
    _overwrite_arg(p)
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("match", help="match two SAEs' features one to one (before / after CPT), "
                       "with both attributions and TSEA contrasts (JSON + PNG)")  # fmt: skip
    p.add_argument("--before", nargs=2, required=True, metavar=("MODEL", "SAE"))
    p.add_argument("--after", nargs=2, required=True, metavar=("MODEL", "SAE"))
    _attribution_args(p)
    p.add_argument("--threshold", type=float, default=0.7,
                   help="decoder cosine for a counterpart (sae.analysis.matching)")  # fmt: skip
    _saved_args(p, "rows")
    _overwrite_arg(p)
    p.set_defaults(func=cmd_match)


def _data_args(p: argparse.ArgumentParser, *, required: bool, help: str) -> None:
    p.add_argument("--data", action="append", default=[], required=required, metavar="DATADIR",
                   help=help)  # fmt: skip
    p.add_argument("--split", default="validation", help="the split of each DATADIR to read")
    p.add_argument("--rows", type=int, default=4096, help="token rows read per DATADIR (at most)")
    p.add_argument("--batch-size", type=int, default=32)


def _attribution_args(p: argparse.ArgumentParser) -> None:
    _data_args(p, required=True, help="held-out token rows (repeat: e.g. translated and native)")
    p.add_argument("--tokenizer", help="TOKDIR (default: the one the model records)")
    p.add_argument("--layer", type=int, help="default: the SAE's hook_layer")
    p.add_argument("--names", action="append", default=[], metavar="NAME=FILE[#COLUMN]",
                   help="two word lists, the first the positive side (default: the demo's "
                   "English and Arabic names)")  # fmt: skip
    p.add_argument("--top", type=int, default=10, help="features listed each way")
    p.add_argument("--out", required=True)


def _saved_args(p: argparse.ArgumentParser, what: str) -> None:
    """--attribution-before/--attribution-after: `_saved_attribution`."""
    for side in ("before", "after"):
        p.add_argument(f"--attribution-{side}", metavar="DIR",
                       help=f"`sae attribute --out DIR` of the --{side} model and SAE on these "
                       f"{what}: read, not computed again")  # fmt: skip


def _overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace an --out made otherwise")


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
    p.add_argument("--contrast", action="append", default=[], metavar="A:B",
                   help="contrast two sets per feature (default with --demo-sets: English vs "
                   "Arabic name starts, Latin vs Arabic quotes; else the first two --names "
                   "lists' starts)")  # fmt: skip
    _data_args(p, required=False, help="held-out rows: features never active there are dead "
               "and left out (default: the SAE's sparsity.safetensors, if any)")  # fmt: skip
    p.add_argument("--layer", type=int, help="default: the SAE's hook_layer")
    p.add_argument("--cosine-sim", action="store_true")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--correction", choices=("bh", "bonferroni"), default="bh")
    p.add_argument("--top", type=int, default=10, help="features listed per set")
    p.add_argument("--null-directions", type=int, default=256,
                   help="random directions for the null baseline (0: none)")  # fmt: skip
    p.add_argument("--null-quantile", type=float, default=0.99)
    p.add_argument("--out", required=True)
    _overwrite_arg(p)


# --- the output ---------------------------------------------------------------------------------

# flags naming inputs, identified by content or fingerprint (the rest are settings, as given)
_INPUTS = ("model", "sae", "before", "after", "data", "tokenizer", "names", "attribution_before",
           "attribution_after")  # fmt: skip
_NOT_IDENTITY = ("func", "command", "sae_command", "out", "overwrite")


def _output(args, kind: str):
    """The --out of an analysis command, as an atomic `jaxlm.outputs.Output` whose identity is
    every flag: models by `model_identity`, SAE and data folders and word lists by fingerprint,
    the tokenizer by content hash, the rest as given. A new command's --out is one line:
    `with _output(args, "kind") as out:` (write into `out.tmp`, then `out.publish()`)."""
    from jaxlm.outputs import Output

    flags = {k: v for k, v in vars(args).items() if k not in _NOT_IDENTITY}
    identity = {k: (_input(k, v) if k in _INPUTS else v) for k, v in flags.items()}
    return Output(args.out, kind=kind, identity=identity, overwrite=args.overwrite)


def _input(flag: str, value):
    from jaxlm.checkpoint import model_identity
    from jaxlm.outputs import file_fingerprint, tree_fingerprint
    from jaxlm.tokenizer import tokenizer_sha256

    if value is None:
        return None
    if flag == "model":
        return model_identity(value)
    if flag in ("before", "after"):  # MODEL SAE
        return [model_identity(value[0]), tree_fingerprint(value[1])]
    if flag == "tokenizer":
        return tokenizer_sha256(value)
    if flag == "names":
        from sae.analysis import tsea

        return [spec + " " + json.dumps(file_fingerprint(tsea.parse_names_spec(spec)[1]))
                for spec in value]  # fmt: skip
    if isinstance(value, list | tuple):  # --data DIR ... (repeated)
        return [tree_fingerprint(v) for v in value]
    return tree_fingerprint(value)  # sae, data


# --- shared steps -------------------------------------------------------------------------------


def _load_sae(sae_dir: str, layer: int | None):
    """(the SAE, as `sae.io.load_sae` gives it, the layer it reads: --layer or its cfg.json's)."""
    from sae.io import load_sae

    sae, info = load_sae(sae_dir)
    where = f"{sae_dir}/cfg.json"
    if sae.cfg.normalize_activations != "none":  # training folds the scale in before saving
        raise UserError(f"{where}: normalize_activations={sae.cfg.normalize_activations!r} is "
                        "not supported here (save it with the scale folded in)")  # fmt: skip
    layer = info.layer if layer is None else layer
    if layer is None:
        raise UserError(
            f"{where}: names no layer (jaxlm.layer, hook_layer, hook_name); pass --layer"
        )
    return sae, layer


def _load(model_dir: str, sae_dir: str, tokdir: str | None, layer: int | None):
    sae, layer = _load_sae(sae_dir, layer)
    model, tok, tokdir = _load_model(model_dir, tokdir)
    _check_fits(model, model_dir, sae, sae_dir, layer)
    return model, sae, layer, tok, tokdir


def _load_model(model_dir: str, tokdir: str | None):
    """(the model, its tokenizer: --tokenizer or the one it records, that tokenizer's dir)."""
    from jaxlm.checkpoint import load_model
    from jaxlm.tokenizer import load_recorded

    model, minfo = load_model(model_dir)
    tok = load_recorded(minfo, tokdir, required=True)  # the one the model records, unchanged
    tokdir = tokdir or minfo.tokenizer
    if tok.vocab_size != model.cfg.vocab_size:
        raise UserError(
            f"{tokdir}: {tok.vocab_size} pieces, but {model_dir} has vocab_size "
            f"{model.cfg.vocab_size}"
        )
    return model, tok, tokdir


def _check_fits(model, model_dir: str, sae, sae_dir: str, layer: int) -> None:
    if not 0 <= layer < model.cfg.n_layers:
        raise UserError(
            f"layer {layer} of {sae_dir}: {model_dir} has layers 0..{model.cfg.n_layers - 1}"
        )
    if sae.cfg.d_in != model.cfg.d_ff:
        raise UserError(
            f"{sae_dir}: the SAE reads {sae.cfg.d_in} dims; {model_dir}'s MLP has {model.cfg.d_ff}"
        )


def _token_sets(args, tok, where: str) -> tuple[dict, list[tuple[str, str]]]:
    """(the named token sets, the pairs to contrast)."""
    from sae.analysis import tsea

    words: dict[str, list[str]] = {}
    regexes: dict[str, str] = {}
    contrasts: list[tuple[str, str]] = []
    if args.demo_sets:
        words.update(tsea.demo_word_lists())
        regexes.update({k: tsea.REGEX_SETS[k] for k in tsea.DEMO_REGEX_SETS})
        contrasts.extend(tsea.DEMO_CONTRASTS)
    named = word_lists(args.names)
    words.update(named)
    if len(named) >= 2 and not args.demo_sets:
        first, second = list(named)[:2]
        contrasts.append((tsea.starts_name(first), tsea.starts_name(second)))
    for spec in args.regex:
        name, sep, pattern = spec.partition("=")
        if not sep or not name or not pattern:
            raise UserError(f"--regex {spec!r}: expected NAME=PATTERN")
        regexes[name] = pattern
    if not words and not regexes:
        raise UserError("no token sets: pass --demo-sets, --names NAME=FILE or --regex NAME=RE")
    if args.contrast:
        contrasts = []
        for spec in args.contrast:
            a, sep, b = spec.partition(":")
            if not sep or not a or not b:
                raise UserError(f"--contrast {spec!r}: expected SET_A:SET_B")
            contrasts.append((a, b))
    starts = {tsea.starts_name(k): v for k, v in words.items()}
    sets = tsea.build_token_sets(tok, words=words, regexes=regexes, word_starts=starts,
                                 where=where)  # fmt: skip
    for a, b in contrasts:
        for n in (a, b):
            if n not in sets:
                raise UserError(f"--contrast {a}:{b}: no token set {n!r}; sets are "
                                f"{', '.join(sets)}")  # fmt: skip
    return sets, contrasts


def _batches(args, tokdir: str | None, what: str) -> list[np.ndarray]:
    """Every --data DIR's --split rows, at most --rows each, as [B, T] batches (read once)."""
    from jaxlm.data.pipeline import read_metadata
    from jaxlm.tokenizer import check_data_tokenizer
    from sae.analysis import dashboards as db

    if args.rows < 1 or args.batch_size < 1:
        raise UserError("--rows and --batch-size must be >= 1")
    out: list[np.ndarray] = []
    for d in args.data:
        check_data_tokenizer(what, tokdir, read_metadata(d)["tokenizer"]["sha256"])
        out.extend(
            db.read_rows(d, split=args.split, max_rows=args.rows, batch_size=args.batch_size)
        )
    return out


def _live(args, model, sae, sae_dir: str, layer: int, tokdir: str | None, what: str,
          saved: tuple[str, Path] | None = None):  # fmt: skip
    """(live [S] or None, frequency [S] or None, where that came from). `saved` (the flag, its
    attribution.npz: `_saved_attribution`): attribute's firing counts on the same rows, read
    instead of counted again: the same integers (a test), so the same results."""
    import numpy as np

    from sae.io import SPARSITY

    if saved is not None:
        from sae.analysis.attribution import saved_counts

        flag, npz = saved
        count, n, meta = saved_counts(npz)
        _same_layer(flag, npz, meta, layer)
        if count.shape != (sae.cfg.n_latents,):
            raise UserError(f"{flag} {npz.parent}: {count.shape[0]} features counted, "
                            f"{sae_dir} has {sae.cfg.n_latents}")  # fmt: skip
        return count > 0, count / max(n, 1), f"--data {args.split} rows ({n} tokens)"
    if args.data:
        from sae.analysis.dashboards import firing_count_fn

        fires = firing_count_fn(model, sae, layer)
        count, n = np.zeros(sae.cfg.n_latents, np.int64), 0
        for batch in _batches(args, tokdir, what):
            count += fires(batch)
            n += batch.size
        return count > 0, count / max(n, 1), f"--data {args.split} rows ({n} tokens)"
    path = Path(sae_dir) / SPARSITY
    if path.is_file():
        from safetensors.numpy import load_file

        log10 = np.asarray(load_file(str(path))["sparsity"], np.float64)
        if log10.shape != (sae.cfg.n_latents,):
            raise UserError(f"{path}: {log10.shape[0]} values for {sae.cfg.n_latents} features")
        # training saves log10(frequency + 1e-10): a latent that never fired reads -10
        return log10 > -9.5, np.maximum(10.0**log10 - 1e-10, 0.0), f"{path} (training)"
    return None, None, "none (no --data, no sparsity.safetensors): every feature counted"


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


# --- commands -----------------------------------------------------------------------------------


def _analyse(args, model_dir: str, sae_dir: str, *, saved: tuple[str, Path] | None = None):
    from sae.analysis import tsea

    model, sae, layer, tok, tokdir = _load(model_dir, sae_dir, args.tokenizer, args.layer)
    sets, contrasts = _token_sets(args, tok, tokdir)
    live, freq, source = _live(args, model, sae, sae_dir, layer, tokdir, f"--model {model_dir}",
                               saved)  # fmt: skip
    res = tsea.tsea(model, sae.W_dec_sf[...], layer, sets, cosine_sim=args.cosine_sim,
                    correction=args.correction, n_null=args.null_directions,
                    null_quantile=args.null_quantile, progress=True, contrasts=contrasts,
                    live=live, frequency=freq)  # fmt: skip
    res.meta.update(model=str(model_dir), sae=str(sae_dir), dead_features_from=source,
                    n_dead=int((~live).sum()) if live is not None else 0)  # fmt: skip
    return res, tsea.display_texts(tok)


def _counts(summary_sets: dict, key: str) -> dict:
    return {n: s.get(key) for n, s in summary_sets.items()}


def cmd_tsea(args) -> int:
    from jaxlm.outputs import say_done
    from sae.analysis import tsea

    with _output(args, "tsea") as owned:
        if owned.done:
            say_done(owned.path)
            return 0
        res, texts = _analyse(args, args.model, args.sae)
        out = owned.tmp
        summary = res.summary(alpha=args.alpha, top=args.top, texts=texts)
        _write_json(out / "tsea.json", summary)
        res.save_npz(out / "tsea.npz")
        tsea.manhattan_plot({"": res}, out / "tsea.png", alpha=args.alpha)
        owned.publish()
    key = "n_promoting_above_null" if args.null_directions else "n_significant_promoting"
    line = {"out": args.out, "features": res.n_features, key: _counts(summary["sets"], key)}
    print(json.dumps(line, ensure_ascii=False))
    return 0


def cmd_compare(args) -> int:
    from jaxlm.outputs import say_done
    from sae.analysis import tsea

    with _output(args, "tsea-compare") as owned:
        if owned.done:
            say_done(owned.path)
            return 0
        sides = {"before": args.before, "after": args.after}
        saved = {key: _saved_attribution(args, key, *side, same=_SAME_ROWS)  # first: refused early
                 for key, side in sides.items()}  # fmt: skip
        (before, texts_b), (after, texts_a) = (
            _analyse(args, *args.before, saved=saved["before"]),
            _analyse(args, *args.after, saved=saved["after"]),
        )
        out = owned.tmp
        cmp = tsea.compare(before, after, alpha=args.alpha, top=args.top, texts_before=texts_b,
                           texts_after=texts_a)  # fmt: skip
        _write_json(out / "tsea_compare.json", cmp)
        before.save_npz(out / "tsea_before.npz")
        after.save_npz(out / "tsea_after.npz")
        tsea.manhattan_plot({"before": before, "after": after}, out / "tsea_compare.png",
                            alpha=args.alpha)  # fmt: skip
        owned.publish()
    key = "n_promoting_above_null" if args.null_directions else "n_significant_promoting"
    change = {n: s["change"].get(key) for n, s in cmp["sets"].items()}
    print(json.dumps({"out": args.out, f"change_in_{key}": change}, ensure_ascii=False))
    return 0


def cmd_dashboard(args) -> int:
    from jaxlm.outputs import say_done

    with _output(args, "dashboard") as owned:
        if owned.done:
            say_done(owned.path)
            return 0
        j, h, n = _dashboard(args, owned.tmp)
        owned.publish()
    print(json.dumps({"json": str(owned.path / j.name), "html": str(owned.path / h.name),
                      "features": n}))  # fmt: skip
    return 0


def _dashboard(args, out: Path) -> tuple[Path, Path, int]:
    from jaxlm.data.pipeline import read_metadata
    from jaxlm.tokenizer import check_data_tokenizer
    from sae.analysis import dashboards as db
    from sae.analysis.tsea import display_texts

    model, sae, layer, tok, tokdir = _load(args.model, args.sae, args.tokenizer, args.layer)
    if args.rows < 1 or args.k < 1 or args.batch_size < 1:
        raise UserError("--rows, --k and --batch-size must be >= 1")
    # the examples are decoded with `tok`: data of another tokenizer would show other text
    check_data_tokenizer(
        f"--model {args.model}", tokdir, read_metadata(args.data)["tokenizer"]["sha256"]
    )
    features = db.parse_features(args.features, sae.cfg.n_latents)
    batches = db.read_rows(
        args.data, split=args.split, max_rows=args.rows, batch_size=args.batch_size
    )
    data = db.dashboards(
        model, sae, layer, batches, features, display_texts(tok), k=args.k, progress=True
    )
    data.update(model=str(args.model), sae=str(args.sae), data=str(args.data))
    j, h = db.write_dashboards(data, out, title=f"SAE features: {Path(args.sae).name}")
    return j, h, len(features)


# --- attribution and matching -------------------------------------------------------------------


def _attribution(
    args,
    model_dir: str,
    sae_dir: str,
    out: Path,
    *,
    dashboards: bool = False,
    saved: tuple[str, Path] | None = None,
):
    """Load, find contexts, attribute; write DIR/attribution.json + .png (+ dashboards).
    `saved` (the flag, its attribution.npz: `_saved_attribution`): read it instead of finding
    contexts and running the forwards; the model and SAE are loaded all the same (the tokenizer
    rebuilds the contrasts; match reads the weights)."""
    from sae.analysis import attribution as at

    model, sae, layer, tok, tokdir = _load(model_dir, sae_dir, args.tokenizer, args.layer)
    contrasts = _contrasts(args, tok)
    if saved is None:
        batches = _batches(args, tokdir, f"--model {model_dir}")
        att = at.attribute(model, sae, layer, batches, tok, contrasts, progress=True)
    else:
        flag, npz = saved
        batches, att = [], at.Attribution.load(npz, contrasts)
        _same_layer(flag, npz, att.meta, layer)
    item = (sae_dir, sae, layer, att, out)
    [summary] = _write_attributions(args, model_dir, model, tok, batches, [item],
                                    dashboards=dashboards)  # fmt: skip
    return att, summary, (model, sae, layer, tok)


def _contrasts(args, tok):
    from sae.analysis import attribution as at

    if args.top < 1:
        raise UserError("--top must be >= 1")
    lists = word_lists(args.names) if args.names else None
    if lists is not None and len(lists) != 2:
        raise UserError(f"--names: give exactly two lists (positive first), got {len(lists)}")
    return at.demo_contrasts(tok, lists)


def _write_attributions(args, model_dir, model, tok, batches, items, *, dashboards: bool):
    """Each item's (SAE_DIR, SAE, layer, its Attribution, DIR) DIR/attribution.json and .png
    (+ dashboards, of every item from one pass over `batches`); their summaries."""
    from sae.analysis import attribution as at
    from sae.analysis.tsea import display_texts

    texts = display_texts(tok)
    link = "dashboards/dashboards.html" if dashboards else None
    summaries = []
    for sae_dir, _, _, att, out in items:
        att.meta.update(model=str(model_dir), sae=str(sae_dir), data=list(args.data),
                        split=args.split)  # fmt: skip
        out.mkdir(parents=True, exist_ok=True)
        summaries.append(att.summary(top=args.top, texts=texts, dashboard=link))
    if dashboards:
        _attribution_dashboards(model, batches, texts, items, summaries)
    for (sae_dir, _, layer, att, out), summary in zip(items, summaries, strict=True):
        _write_json(out / "attribution.json", summary)
        at.bar_plot(att, out / "attribution.png", title=f"{model_dir} · {sae_dir} · layer {layer}")
    return summaries


def _attribution_dashboards(model, batches, texts, items, summaries):
    """Dashboards of every listed feature of each item (`_write_attributions`), from one pass;
    each entry learns how many of its top contexts sit at the contrast's targets (the context
    position or the target's first token)."""
    import numpy as np

    from sae.analysis import dashboards as db

    feats = [sorted({e["feature"] for c in summary["contrasts"].values()
                     for e in c["top_features"] + c["bottom_features"]})
             for summary in summaries]  # fmt: skip
    todo = [i for i, f in enumerate(feats) if f]
    if not todo:
        return
    data = db.dashboards_layers(model, [(items[i][1], items[i][2], np.asarray(feats[i]))
                                        for i in todo], batches, texts, progress=True)  # fmt: skip
    for i, d in zip(todo, data, strict=True):
        sae_dir, _, _, att, out = items[i]
        db.write_dashboards(d, out / "dashboards", title=f"SAE features: {Path(sae_dir).name}")
        by_feature = {f["feature"]: f["contexts"] for f in d["features"]}
        for r in att.results:
            at_targets = {(int(row), int(p) + dd) for row, p in zip(r.contexts.row,
                          r.contexts.pos, strict=True) for dd in (0, 1)}  # fmt: skip
            c = summaries[i]["contrasts"][r.contrast.name]
            for e in c["top_features"] + c["bottom_features"]:
                ctxs = by_feature[e["feature"]]
                hits = sum((x["row"], x["position"]) in at_targets for x in ctxs)
                e["dashboard_contexts_at_targets"] = f"{hits}/{len(ctxs)}"


def _line(summary: dict) -> dict:
    out = {}
    for name, c in summary["contrasts"].items():
        out[name] = {"contexts": c["contexts"], "features": c["balanced"]["features"],
                     "error_share": c["error_share"]}  # fmt: skip
    return out


def cmd_attribute(args) -> int:
    from jaxlm.outputs import say_done

    if len(args.sae) > 1:
        return _attribute_several(args)
    args = argparse.Namespace(**{**vars(args), "sae": args.sae[0]})  # identity: as before
    with _output(args, "attribution") as owned:
        if owned.done:
            say_done(owned.path)
            return 0
        att, summary, _ = _attribution(args, args.model, args.sae, owned.tmp,
                                       dashboards=args.dashboards)  # fmt: skip
        att.save(owned.tmp / "attribution.npz")  # for `sae match --attribution-before/after`
        owned.publish()
    print(json.dumps({"out": str(args.out), **_line(summary)}, ensure_ascii=False))
    return 0


def _attribute_several(args) -> int:
    """`sae attribute` with several --sae: each SAE's output OUT/layer-N is the one `--sae it
    --out OUT/layer-N` makes (its identity too, so `sae match` and reruns read it alike); one
    model load, one context search and one forward a batch serve them all. Those already made
    with these inputs are kept; nothing is written unless every one is made."""
    import contextlib

    from jaxlm.outputs import say_done
    from sae.analysis import attribution as at

    if args.layer is not None:
        raise UserError("--layer: give it with one --sae only (each SAE reads its own layer)")
    loaded = [_load_sae(d, None) for d in args.sae]  # (SAE, the layer its cfg.json names)
    layers = [layer for _, layer in loaded]
    for layer in set(layers):
        if layers.count(layer) > 1:
            same = [d for d, x in zip(args.sae, layers, strict=True) if x == layer]
            raise UserError(f"--sae {' and '.join(same)}: both read layer {layer}; one per layer")
    per = [argparse.Namespace(**{**vars(args), "sae": d, "out": str(Path(args.out) / f"layer-{x}")})
           for d, x in zip(args.sae, layers, strict=True)]  # fmt: skip
    with contextlib.ExitStack() as stack:
        owned = [stack.enter_context(_output(a, "attribution")) for a in per]
        todo = [i for i, o in enumerate(owned) if not o.done]
        for o in owned:
            if o.done:
                say_done(o.path)
        if todo:
            model, tok, tokdir = _load_model(args.model, args.tokenizer)
            saes = [loaded[i] for i in todo]
            for i, (sae, layer) in zip(todo, saes, strict=True):
                _check_fits(model, args.model, sae, per[i].sae, layer)
            contrasts = _contrasts(args, tok)
            batches = _batches(args, tokdir, f"--model {args.model}")
            atts = at.attribute_layers(model, saes, batches, tok, contrasts, progress=True)
            items = [(per[i].sae, sae, layer, att, owned[i].tmp)
                     for i, (sae, layer), att in zip(todo, saes, atts, strict=True)]  # fmt: skip
            summaries = _write_attributions(args, args.model, model, tok, batches, items,
                                            dashboards=args.dashboards)  # fmt: skip
            for i, att in zip(todo, atts, strict=True):
                att.save(owned[i].tmp / "attribution.npz")
            for i in todo:
                owned[i].publish()
            for i, summary in zip(todo, summaries, strict=True):
                print(json.dumps({"out": per[i].out, **_line(summary)}, ensure_ascii=False))
    return 0


def cmd_match(args) -> int:
    if not -1.0 <= args.threshold <= 1.0:
        raise UserError(f"--threshold {args.threshold}: a cosine is in [-1, 1]")
    from jaxlm.outputs import say_done

    with _output(args, "matching") as owned:
        if owned.done:
            say_done(owned.path)
            return 0
        report = _match(args, owned.tmp)
        owned.publish()
    keys = ("matched_above_threshold", "lost_before", "new_after")
    print(json.dumps({"out": str(args.out), **{k: report[k] for k in keys}}))
    return 0


def _match(args, out: Path) -> dict:
    from sae.analysis import attribution as at
    from sae.analysis import matching, tsea

    sides = {"before": args.before, "after": args.after}
    saved = {key: _saved_attribution(args, key, *side, same=_SAME_CONTEXTS)  # first
             for key, side in sides.items()}  # fmt: skip
    runs = {}
    for key, (model_dir, sae_dir) in sides.items():
        att, summary, (model, sae, layer, tok) = _attribution(args, model_dir, sae_dir, out / key,
                                                              saved=saved[key])  # fmt: skip
        r = att["names"]
        sets = dict(zip(r.contrast.labels, r.contrast.sets["pooled"], strict=True))
        freq = att.active_count / max(att.n_tokens, 1)
        res = tsea.tsea(model, sae.W_dec_sf[...], layer, sets, contrasts=[tuple(sets)],
                        live=att.live, frequency=freq)  # fmt: skip
        W_down = model.blocks[layer].mlp.w_down_fd[...]
        runs[key] = (att, res, at.effective_decoder(sae)[0], W_down)
    (att_b, res_b, W_b, down_b), (att_a, res_a, W_a, down_a) = runs["before"], runs["after"]
    m = matching.match_features(W_b, W_a, live_before=att_b.live, live_after=att_a.live)
    report = matching.match_report(
        att_b, att_a, m, tsea_before=res_b, tsea_after=res_a, pair_index=0,
        threshold=args.threshold, top=args.top,
        write_cos=matching.write_cosine(W_b, W_a, down_b, down_a, m),
        chance=matching.chance_cosine(m.n_before, m.n_after, W_b.shape[1]),
    )  # fmt: skip
    report["tsea_names_contrast"] = {
        "before": res_b.contrast_summary(0, top=args.top),
        "after": res_a.contrast_summary(0, top=args.top),
    }
    report.update(before={"model": args.before[0], "sae": args.before[1]},
                  after={"model": args.after[0], "sae": args.after[1]})  # fmt: skip
    _write_json(out / "match.json", report)
    matching.scatter_plot(att_b, att_a, m, out / "match.png", threshold=args.threshold)
    return report


# what `sae attribute` must have been given, besides the model and SAE, to have read these rows
# as they are read here: the data, split, rows and batch size (a batch's shape moves the last bits
# of a float: on the demo, batches of 8 instead of 32 move 3 of 1,024 features' counts by one)
_SAME_ROWS = ("data", "split", "rows", "batch_size")
# ... and to have found the same contexts in them (match): the tokenizer and word lists
_SAME_CONTEXTS = (*_SAME_ROWS, "tokenizer", "names")


def _saved_attribution(
    args, key: str, model_dir: str, sae_dir: str, *, same: tuple[str, ...]
) -> tuple[str, Path] | None:
    """(--attribution-KEY, its attribution.npz), or None without the flag: a `sae attribute`
    output whose recorded identity (`_output`) names the same model and SAE as --KEY and the same
    flags `same` as these args (`_SAME_ROWS`: tsea-compare reads only its firing counts, which
    neither the word lists nor the tokenizer change; `_SAME_CONTEXTS`: match reads its contexts).
    Anything else is refused, never computed again quietly; so is one that read another number of
    rows than these flags read now (`dashboards.rows_read`): an earlier jaxlm, given the same
    flags, left out each source's last partial batch, so its counts and contexts are of fewer rows
    than this side's or the other side's. The layer is checked when the arrays are read
    (`_same_layer`): --layer may name the SAE's own."""
    from jaxlm.outputs import read_identity
    from sae.analysis import dashboards as db
    from sae.analysis.attribution import saved_meta

    flag, d = f"--attribution-{key}", getattr(args, f"attribution_{key}")
    if d is None:
        return None
    rec = read_identity(d, directory=True) if Path(d).is_dir() else None
    if rec is None or rec.get("kind") != "attribution":
        raise UserError(f"{flag} {d}: not a `jaxlm sae attribute` output")
    npz = Path(d) / "attribution.npz"
    if not npz.is_file():
        raise UserError(f"{flag} {d}: no attribution.npz (an earlier jaxlm's output): attribute "
                        f"again with --overwrite, or leave {flag} out")  # fmt: skip
    want = {"model": model_dir, "sae": sae_dir} | {k: getattr(args, k) for k in same}
    want = {k: (_input(k, v) if k in _INPUTS else v) for k, v in want.items()}
    diff = _what_differs(rec.get("identity", {}), want)
    if diff:
        raise UserError(f"{flag} {d} was attributed from other inputs than --{key} and these rows "
                        f"({diff}): pass the one made from these, or leave {flag} out")  # fmt: skip
    read = sum(db.rows_read(src, split=args.split, max_rows=args.rows) for src in args.data)
    rows = saved_meta(npz).get("rows")
    if rows != read:
        raise UserError(f"{flag} {d}: attributes {rows} rows, these flags read {read}: attribute "
                        f"again with --overwrite, or leave {flag} out")  # fmt: skip
    return flag, npz


def _same_layer(flag: str, npz: Path, meta: dict, layer: int) -> None:
    """A saved attribution (`_saved_attribution`) of another layer than the one read here is
    refused: --layer may name another than the SAE's own."""
    if meta.get("layer") != layer:
        raise UserError(f"{flag} {npz.parent}: attributes layer {meta.get('layer')}, "
                        f"this reads layer {layer}")  # fmt: skip


def _what_differs(saved: dict, want: dict) -> str:
    """Each input of `want` that `saved` records otherwise, as `key OLD -> NEW`: by path where
    the paths differ, else what changed at the same path (`differences`: `sae.mtime 1 -> 2`)."""
    from jaxlm.outputs import differences

    def paths(v):  # fingerprints (`_input`) by their paths
        if isinstance(v, dict) and "path" in v:
            return v["path"]
        return [paths(x) for x in v] if isinstance(v, list) else v

    out = []
    for k, v in want.items():
        diff = differences({k: saved.get(k)}, {k: v})
        if diff:
            a, b = paths(saved.get(k)), paths(json.loads(json.dumps(v)))
            out.append(f"{k} {json.dumps(a, ensure_ascii=False)} -> "
                       f"{json.dumps(b, ensure_ascii=False)}" if a != b else diff[0])  # fmt: skip
    return "; ".join(out)
