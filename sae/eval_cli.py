"""`jaxlm sae eval | ablate`: thin wrappers over sae.evaluate and sae.ablate.

jaxlm sae eval --model M --sae SAEDIR --data DATADIR [--data DATADIR ...] [--split validation]
    [--rows 256] [--batch-size 8] --out eval.json
jaxlm sae ablate --model M --sae SAEDIR [--sae SAEDIR ...]
    (--features 3,17,42 [--features ...] | --random K [--seed S])
    [--data DATADIR ...] [--mode zero | --mode clamp --value X] --n 48 --max-new-tokens 160
    [--names english=FILE[#COLUMN] --names arabic=FILE[#COLUMN]] --out samples.jsonl

Several --sae (or one directory of layer-N/ SAEs, as `jaxlm sae train --layers` writes) remove
features at all their layers in one forward pass, each layer keeping its SAE's error term: a
preference spread over the layers' MLPs cannot be removed at one of them. --features then names
one spec per --sae in the same order, --random K draws K per SAE (SAE i with seed + i).
"""

from __future__ import annotations

import argparse
import json
import re
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from jaxlm.errors import UserError

if TYPE_CHECKING:
    from jaxlm.model import LayerEdits
    from sae.ablate import FeatureAblation


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `eval` and `ablate` to the `sae` group."""
    p = sub.add_parser(
        "eval",
        help="SAELens' SAE metrics on held-out rows: CE loss recovered, "
        "KL, explained variance, L0, dead and dense latents (JSON)",
    )
    _model_args(p)
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DATADIR",
        help="prepared data; repeat for several sources (each reported, and pooled)",
    )
    p.add_argument(
        "--split",
        default="validation",
        help="validation (falls back to train where a DATADIR has none) or train",
    )
    p.add_argument("--rows", type=int, default=256, help="rows per source (at most)")
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward")
    p.add_argument("--seed", type=int, default=0, help="which rows, when a split has more")
    p.add_argument(
        "--out",
        required=True,
        help="the result (JSON); also written into the SAE's "
        "directory (eval.json and cfg.json's jaxlm.eval)",
    )
    p.set_defaults(func=cmd_eval)

    a = sub.add_parser(
        "ablate",
        help="sample stories with SAE features removed, and without; "
        "their translation artifacts side by side",
    )
    _model_args(a, several=True)
    pick = a.add_mutually_exclusive_group(required=True)
    pick.add_argument(
        "--features",
        action="append",
        help="latent ids, e.g. 3,17,42; with several --sae, one per --sae in the same order",
    )
    pick.add_argument(
        "--random",
        metavar="K[,K...]",
        help="K random live features per SAE (a control); or one K per --sae, in the same order "
        "(as many per layer as the features they control for)",
    )
    a.add_argument(
        "--seed", type=int, default=0, help="the --random draw's seed (SAE i draws with seed + i)"
    )
    a.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="DATADIR",
        help="held-out rows (repeat for several sources): the name-slot logit difference at "
        "attribute's name contexts there, without and with the edit; with --random also where "
        "live features are found (default: fired in training, the SAE's sparsity.safetensors)",
    )
    a.add_argument("--split", default="validation")
    a.add_argument("--rows", type=int, default=256, help="rows per DATADIR for live features")
    a.add_argument(
        "--logit-rows",
        type=int,
        default=4096,
        help="rows per DATADIR for the name-slot logit difference (attribute's --rows default)",
    )
    a.add_argument(
        "--mode",
        choices=("zero", "clamp"),
        default="zero",
        help="zero: remove the features' decoded part; clamp: set them to --value",
    )
    a.add_argument("--value", type=float, help="with --mode clamp: the features' activation")
    a.add_argument("--n", type=int, default=48, help="stories")
    a.add_argument("--prompts", help="story beginnings: one a line, or JSONL (`text`)")
    a.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    a.add_argument("--max-new-tokens", type=int, default=160)
    a.add_argument("--temperature", type=float, default=0.8)
    a.add_argument("--top-k", type=int, default=50)
    a.add_argument("--batch-size", type=int, default=64, help="stories sampled at once")
    a.add_argument("--sample-seed", type=int, default=0, help="sampling and bootstrap seed")
    a.add_argument(
        "--names",
        action="append",
        default=[],
        metavar="SIDE=FILE[#COLUMN]",
        help="english=... and arabic=... name lists (default: the demo corpus'); with --data "
        "also the name contexts' lists, as attribute reads them",
    )
    a.add_argument(
        "--english-top",
        type=int,
        metavar="K",
        help="first K English entries only (the sampled stories' rates; the name contexts read "
        "the lists whole, as attribute does)",
    )
    a.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    a.add_argument(
        "--baseline-from",
        metavar="REPORT",
        help="an earlier ablate run's --report with the same model, tokenizer, prompts and "
        "sampling flags: its unedited stories are this run's (refused otherwise), not sampled "
        "again (e.g. the random control after the top features)",
    )
    a.add_argument("--out", required=True, help="the stories (JSONL: ablated and baseline text)")
    a.add_argument("--report", help="the metrics (JSON; default: OUT with .artifacts.json)")
    a.set_defaults(func=cmd_ablate)


def _model_args(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument(
        "--model",
        help="model dir, training workdir or HF dir (default: the one the SAE's cfg.json records)",
    )
    if several:
        p.add_argument(
            "--sae",
            action="append",
            required=True,
            help="SAE directory (cfg.json + sae_weights); repeat for SAEs at other layers, or "
            "give a directory of layer-N/ SAEs (jaxlm sae train --layers) for all of them",
        )
    else:
        p.add_argument("--sae", required=True, help="SAE directory (cfg.json + sae_weights)")
    only = " (with one SAE only)" if several else ""
    p.add_argument("--layer", type=int, help=f"default: the layer the SAE's cfg.json names{only}")


def _load(args):
    """(model, its ModelInfo, the SAE, the SAE's directory info, the layer)."""
    model, minfo, [(_, sae, info, layer)] = _load_saes(args, [args.sae])
    return model, minfo, sae, info, layer


def _load_saes(args, paths: list[str]):
    """(model, its ModelInfo, [(path, SAE, its directory info, its layer)] in `paths`' order):
    the model --model names, else the one the SAEs' cfg.json record (all the same one)."""
    from jaxlm.checkpoint import load_model
    from sae.evaluate import check_fits
    from sae.io import load_sae

    if args.layer is not None and len(paths) > 1:
        raise UserError(f"--layer {args.layer} goes with one SAE; {len(paths)} SAEs each take "
                        "the layer their cfg.json names")  # fmt: skip
    saes = []
    for path in paths:
        sae, info = load_sae(path)
        layer = info.layer if args.layer is None else args.layer
        if layer is None:
            raise UserError(
                f"{path}/cfg.json names no layer (jaxlm.layer, hook_name); pass --layer"
            )
        saes.append((path, sae, info, layer))
    layers = [layer for *_, layer in saes]
    twice = sorted({i for i in layers if layers.count(i) > 1})
    if twice:
        raise UserError(f"--sae: several SAEs read layer {twice[0]}; one SAE per layer")
    recorded = list(dict.fromkeys(info.model_path for _, _, info, _ in saes))
    model_path = args.model or recorded[0]
    if not model_path:
        raise UserError(f"{paths[0]}/cfg.json records no model: pass --model")
    if not args.model and len(recorded) > 1:
        raise UserError(f"the SAEs record different models ({', '.join(map(str, recorded))}): "
                        "pass --model")  # fmt: skip
    model, minfo = load_model(model_path)
    for path, sae, _, layer in saes:
        check_fits(model, sae, layer, where=f"SAE {path}")
    return model, minfo, saes


def _sae_dirs(given: list[str]) -> list[str]:
    """The SAE directories of the --sae arguments: each as given, except a directory with no
    cfg.json whose layer-N/ subdirectories hold SAEs (`jaxlm sae train --layers`), which stands
    for those, in layer order."""
    from sae.io import CFG

    out = []
    for d in given:
        p = Path(d)
        found = []
        if p.is_dir() and not (p / CFG).is_file():
            for sub in p.iterdir():
                m = re.fullmatch(r"layer-(\d+)", sub.name)
                if m and (sub / CFG).is_file():
                    found.append((int(m.group(1)), str(sub)))
        out += [path for _, path in sorted(found)] or [d]  # none: load_sae says what is missing
    return out


def _check_tokenizer(model_path: str, tokdir: str | None, datadir: str) -> None:
    from jaxlm.data.pipeline import read_metadata
    from jaxlm.tokenizer import check_data_tokenizer

    sha = read_metadata(datadir)["tokenizer"]["sha256"]
    check_data_tokenizer(f"--model {model_path}", tokdir, sha)


def _write(path: str | Path, text: str) -> None:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UserError(f"{p}: cannot write ({e.strerror})") from None


def cmd_eval(args) -> int:
    from sae.evaluate import evaluate, save_eval

    model, minfo, sae, info, layer = _load(args)
    for d in args.data:
        _check_tokenizer(minfo.path, minfo.tokenizer, d)
    result = evaluate(
        model,
        sae,
        layer,
        args.data,
        split=args.split,
        rows=args.rows,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=True,
    )
    result = {"model": minfo.path, "sae": str(args.sae), **result}
    _write(args.out, json.dumps(result, indent=2) + "\n")
    save_eval(args.sae, result)
    keys = ("ce_loss_score", "kl_div_with_sae", "explained_variance", "l0", "dead_fraction")
    print(json.dumps({"out": args.out, **{k: result["pooled"][k] for k in keys}}))
    return 0


def _features(args, model, sae, info, layer, index: int = 0) -> tuple[list[int], dict]:
    """(the features to ablate with the `index`-th SAE, how they were chosen): its --features
    spec, or --random K live ones drawn with seed --seed + index."""
    import numpy as np

    from sae import ablate
    from sae.evaluate import eval_split, firing_counts, read_rows

    if args.features is not None:
        return ablate.parse_features(args.features[index], sae.cfg.n_latents), {"how": "given"}
    if args.data:  # active on the rows of any of them
        counts, tokens, where = np.zeros(sae.cfg.n_latents, np.int64), 0, []
        for d in args.data:
            split, _ = eval_split(d, args.split)
            rows = read_rows(d, split=split, max_rows=args.rows, batch_size=8)
            c, t = firing_counts(model, sae, layer, rows)
            counts, tokens = counts + c, tokens + t
            where.append(f"{d} [{split}]")
        live = np.flatnonzero(counts)
        live_from = f"active on {tokens} tokens of {', '.join(where)}"
    else:
        live = ablate.live_from_sparsity(info.path)
        live_from = f"fired in training ({info.path}/sparsity.safetensors, log10 freq > -10)"
    seed, k = args.seed + index, args.random[index]
    feats = ablate.pick_random(live, k, seed)
    return feats, {
        "how": "random live",
        "k": k,
        "seed": seed,
        "live_from": live_from,
        "n_live": int(len(live)),
    }


def cmd_ablate(args) -> int:
    from jaxlm.eval.artifacts import NameLists
    from jaxlm.eval.samples import load_prompts
    from jaxlm.generate import SamplingConfig
    from jaxlm.tokenizer import Tokenizer
    from sae.ablate import ablation_report, parse_counts

    if (args.mode == "clamp") != (args.value is not None):
        raise UserError("--value goes with --mode clamp (and --mode clamp needs --value)")
    if args.n < 1 or args.resamples < 1:
        raise UserError(f"--n {args.n} and --resamples {args.resamples} must be >= 1")
    if args.data and args.logit_rows < 1:
        raise UserError(f"--logit-rows {args.logit_rows}: must be >= 1")
    lists = NameLists.from_specs(args.names, args.english_top) if args.names else None
    prompts = load_prompts(args.prompts) if args.prompts else None
    paths = _sae_dirs(args.sae)
    if args.features is not None and len(args.features) != len(paths):
        raise UserError(f"{len(args.features)} --features for {len(paths)} SAEs: give one "
                        "--features per --sae, in the same order")  # fmt: skip
    if args.random is not None:
        args.random = parse_counts(args.random, len(paths))
    model, minfo, saes = _load_saes(args, paths)
    tokdir = args.tokenizer or minfo.tokenizer
    if not tokdir:
        raise UserError(f"{minfo.path} records no tokenizer: pass --tokenizer")
    for d in args.data:
        _check_tokenizer(minfo.path, tokdir, d)
    edit, which = _ablation(args, model, saes)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    settings = {
        "n": args.n,
        "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "seed": args.sample_seed,
        "batch_size": args.batch_size,
    }
    # absolute where they are paths, so that another run's report compares alike (--baseline-from)
    where = {"model": _absolute(minfo.path), "tokenizer": _absolute(tokdir)}
    baseline = (_baseline_from(args.baseline_from, where, settings, prompts)
                if args.baseline_from else None)  # fmt: skip
    tok = Tokenizer.load(tokdir)
    logit = _name_logit_diff(args, model, tok, edit) if args.data else None
    rows, report = ablation_report(
        model,
        tok,
        edit,
        n=args.n,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
        seed=args.sample_seed,
        batch_size=args.batch_size,
        lists=lists,
        resamples=args.resamples,
        baseline=baseline,
    )
    report_path = args.report or str(Path(args.out).with_suffix(".artifacts.json"))
    report = {
        **where,
        **which,
        "mode": args.mode,
        "value": args.value,
        "sampling": settings,
        "samples": str(Path(args.out).resolve()),
        **({"baseline_from": str(Path(args.baseline_from).resolve())} if baseline else {}),
        **report,
        **({"name_logit_diff": logit} if logit is not None else {}),
    }
    _write(args.out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _write(report_path, json.dumps(report, ensure_ascii=False, indent=2) + "\n")
    print(
        json.dumps(
            {
                "samples": str(args.out),
                "report": report_path,
                "features": which["features"],
                "difference": report["difference"],
                **({"name_logit_diff": logit["difference"]} if logit is not None else {}),
            },
            ensure_ascii=False,
        )
    )
    return 0


def _absolute(path: str) -> str:
    """A path that exists, made absolute; anything else (a hub name) as given."""
    p = Path(path)
    return str(p.resolve()) if p.exists() else path


def _baseline_from(path: str, where: dict, settings: dict, prompts: list[str] | None) -> list[str]:
    """The unedited stories of the ablate run whose report is `path`, when it sampled what this
    run would: the same model and tokenizer, every sampling flag the same, and each story begun
    from the prompt this run gives it (else one line naming what differs)."""
    flag = f"--baseline-from {path}"
    try:
        earlier = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot read it as JSON ({e})") from None
    if not isinstance(earlier, dict):
        raise UserError(f"{flag}: not an ablate report (a JSON object)")
    theirs = {**{k: earlier.get(k) for k in where}, **(earlier.get("sampling") or {})}
    for k, ours in {**where, **settings}.items():
        if theirs.get(k) != ours:
            raise UserError(f"{flag}: it sampled with {k}={theirs.get(k)!r}, this run with "
                            f"{k}={ours!r}: not the same stories")  # fmt: skip
    samples = Path(str(earlier.get("samples")))
    try:
        lines = samples.read_text(encoding="utf-8").splitlines()
        rows = [json.loads(x) for x in lines if x.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: its stories {samples}: {e}") from None
    seeds = [settings["seed"] + i // settings["batch_size"] for i in range(settings["n"])]
    if [r.get("seed") if isinstance(r, dict) else None for r in rows] != seeds:
        raise UserError(f"{flag}: its stories {samples} are not the {settings['n']} its report "
                        "names (rows missing, or another run's)")  # fmt: skip
    begin = prompts or [""]
    for i, r in enumerate(rows):
        if r.get("prompt") != begin[i % len(begin)]:
            raise UserError(f"{flag}: its story {i} began from another prompt than this run's")
    texts = [r.get("baseline") for r in rows]
    if not all(isinstance(t, str) for t in texts):
        raise UserError(f"{flag}: its stories {samples}: a row without its baseline text")
    return texts


def _ablation(args, model, saes) -> tuple[FeatureAblation | LayerEdits, dict]:
    """(the edit, the report's account of it: SAE, layer, features, their selection). One SAE: a
    FeatureAblation; several: a LayerEdits of one per SAE, the report's features and selection
    keyed by layer (JSON keys: strings)."""
    from jaxlm.model import LayerEdits
    from sae.ablate import FeatureAblation

    ablation = partial(FeatureAblation, mode=args.mode, value=args.value or 0.0)
    if len(saes) == 1:
        [(path, sae, info, layer)] = saes
        features, chosen = _features(args, model, sae, info, layer)
        which = {"sae": path, "layer": layer, "features": features, "selection": chosen}
        return ablation(sae, layer, features), which
    picked = {}
    for i, (path, sae, info, layer) in enumerate(saes):
        try:
            picked[layer] = _features(args, model, sae, info, layer, i)
        except UserError as e:  # which of the SAEs
            raise UserError(f"--sae {path}: {e}") from None
    edit = LayerEdits([ablation(sae, layer, picked[layer][0]) for _, sae, _, layer in saes])
    return edit, {
        "sae": [path for path, *_ in saes],
        "layers": [layer for *_, layer in saes],
        "features": {str(layer): feats for layer, (feats, _) in picked.items()},
        "selection": {str(layer): chosen for layer, (_, chosen) in picked.items()},
    }


def _name_logit_diff(args, model, tok, edit) -> dict:
    """`sae.ablate.name_logit_diff` on the --data rows attribute would read (its row reader, the
    same --split, --logit-rows each) and the --names lists as attribute takes them."""
    from jaxlm.eval.wordlists import word_lists
    from sae.ablate import name_logit_diff
    from sae.analysis.dashboards import read_rows

    lists: dict[str, list[str]] | None = None
    if args.names:  # whole lists (no --english-top), English first; both checked by NameLists
        named = word_lists(args.names)  # as attribute reads them
        lists = {"english": named["english"], "arabic": named["arabic"]}
    read = partial(read_rows, split=args.split, max_rows=args.logit_rows, batch_size=32)
    batches = (b for d in args.data for b in read(d))
    result = name_logit_diff(model, tok, edit, batches, lists, resamples=args.resamples,
                             seed=args.sample_seed)  # fmt: skip
    return {"data": list(args.data), "split": args.split, "rows_per_source": args.logit_rows,
            **result}  # fmt: skip
