"""`jaxlm eval`: metrics on stories or on a model's samples.

    jaxlm eval artifacts --stories samples.jsonl
    jaxlm eval artifacts --checkpoint runs/demo/cpt --n 200 --out cpt_artifacts.json \\
        --names english=../shared/data/names/english_first_names_arabic_script.tsv#arabic \\
        --names arabic=../shared/data/names/arabic_first_names.txt --english-top 1000
"""

from __future__ import annotations

import argparse
import contextlib
import json

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `eval artifacts`."""
    p = sub.add_parser("eval", help="metrics on stories or a model's samples")
    evals = p.add_subparsers(dest="eval_command", required=True)
    a = evals.add_parser(
        "artifacts",
        help="translation artifacts (English names, English dialogue order) and text quality",
        description="Per-story translation-artifact and text metrics, pooled over stories with "
        "95% bootstrap intervals (definitions: jaxlm/eval/artifacts.py).",
    )
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--stories", help="JSONL (--field), CSV (--field), or .txt (stories "
                     "separated by <|endoftext|> or blank lines)")  # fmt: skip
    src.add_argument("--checkpoint", help="a model to sample stories from (model dir, workdir, HF)")
    a.add_argument("--field", default="text", help="JSONL field / CSV column (stories, prompts)")
    a.add_argument("--n", type=int, help="stories to sample (default 48, or one per prompt)")
    a.add_argument("--prompts", help="story beginnings: one a line, or JSONL (--field)")
    a.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    a.add_argument("--max-new-tokens", type=int, default=160)
    a.add_argument("--temperature", type=float, default=0.8)
    a.add_argument("--top-k", type=int, default=50)
    a.add_argument("--batch-size", type=int, default=64, help="stories sampled at once")
    a.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    a.add_argument("--names", action="append", default=[], metavar="SIDE=FILE[#COLUMN]",
                   help="english=... and arabic=... name lists (repeat a side for a union; "
                   "default: the demo corpus' lists)")  # fmt: skip
    a.add_argument("--english-top", type=int, metavar="K",
                   help="only the first K entries of each English list (the shared "
                   "english_first_names_arabic_script.tsv is sorted by popularity: "
                   "1000 is sensible)")  # fmt: skip
    a.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    a.add_argument("--out", help="write the report (JSON) here too")
    a.add_argument("--per-story", help="write each story's values here (JSONL)")
    a.add_argument("--samples-out", help="with --checkpoint: write the sampled stories (JSONL)")
    a.add_argument("--overwrite", action="store_true",
                   help="replace --out, --per-story, --samples-out made otherwise")  # fmt: skip
    a.set_defaults(func=cmd_artifacts)
    _register_loss(evals)


def _register_loss(evals: argparse._SubParsersAction) -> None:
    p = evals.add_parser(
        "loss",
        help="next-token loss and perplexity per data source (repair and forgetting side by side)",
        description="Validation loss per DATADIR, with a 95%% interval over rows "
        "(definitions: jaxlm/eval/loss.py).",
    )
    p.add_argument("--checkpoint", required=True, help="model dir, training workdir or HF dir")
    p.add_argument("--data", action="append", required=True, metavar="DATADIR",
                   help="a prepared DATADIR (repeat: each is reported separately)")  # fmt: skip
    p.add_argument("--split", default="validation")
    p.add_argument("--rows", type=int, default=512, help="rows per source (at most)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--overwrite", action="store_true", help="replace an --out made otherwise")
    p.set_defaults(func=cmd_loss)


def cmd_loss(args) -> int:

    if args.rows < 1 or args.batch_size < 1:
        raise UserError("--rows and --batch-size must be >= 1")
    with contextlib.ExitStack() as stack:
        owned = stack.enter_context(_loss_output(args)) if args.out else None
        if owned is not None and owned.done:
            print(owned.path.read_text(encoding="utf-8"), end="")
            return 0
        text = json.dumps(_losses(args), ensure_ascii=False, indent=1) + "\n"
        print(text, end="")
        _publish(owned, text)
    return 0


def _loss_output(args):
    from jaxlm.checkpoint import model_identity
    from jaxlm.outputs import Output, tree_fingerprint

    identity = {"model": model_identity(args.checkpoint), "split": args.split,
                "rows": args.rows, "data": [tree_fingerprint(d) for d in args.data]}  # fmt: skip
    return Output(args.out, kind="eval-loss", identity=identity, directory=False,
                  overwrite=args.overwrite)  # fmt: skip


def _losses(args) -> dict:
    from jaxlm.checkpoint import load_model
    from jaxlm.data.pipeline import read_metadata
    from jaxlm.eval.loss import evaluate_sources, model_losses_fn
    from jaxlm.tokenizer import check_data_tokenizer

    model, info = load_model(args.checkpoint)
    for d in args.data:  # other ids than the model's would give a meaningless loss
        check_data_tokenizer(f"--checkpoint {args.checkpoint}", info.tokenizer,
                             read_metadata(d)["tokenizer"]["sha256"])  # fmt: skip
    return {
        "checkpoint": str(args.checkpoint),
        "step": info.step,
        "sources": evaluate_sources(model_losses_fn(model), args.data, split=args.split,
                                    max_rows=args.rows, batch_size=args.batch_size),
    }  # fmt: skip


def cmd_artifacts(args) -> int:
    """The report, per-story values and samples are atomic `jaxlm.outputs.Output` files, each
    identified by what it depends on (the stories or the model and its sampling; the name lists;
    the bootstrap). Files already made with the same settings are kept (and read back: a report
    found done is printed, samples found done are measured again, not resampled); other ones are
    refused unless --overwrite."""
    from jaxlm.eval.artifacts import NameLists, artifact_metrics, read_stories
    from jaxlm.outputs import say_done

    if args.resamples < 1:
        raise UserError(f"--resamples {args.resamples}: must be >= 1")
    if args.stories and (args.prompts or args.n is not None or args.samples_out):
        raise UserError("--n, --prompts and --samples-out sample a model: use --checkpoint")
    lists = NameLists.from_specs(args.names, args.english_top) if args.names else None
    if lists is None and args.english_top is not None:
        raise UserError("--english-top needs --names english=FILE[#COLUMN]")
    with contextlib.ExitStack() as stack:
        outs = {k: stack.enter_context(o) for k, o in _outputs(args).items()}
        if "report" in outs and all(o.done for o in outs.values()):
            for o in outs.values():
                say_done(o.path)
            print(outs["report"].path.read_text(encoding="utf-8"), end="")
            return 0
        if args.stories:
            stories, source = read_stories(args.stories, args.field), {"stories": args.stories}
        else:
            stories, source = _sample(args, outs.get("samples"))
        report = artifact_metrics(stories, lists, resamples=args.resamples, seed=args.seed)
        per_story = report.pop("per_story")
        text = json.dumps({"source": source, **report}, ensure_ascii=False, indent=2) + "\n"
        print(text, end="")
        _publish(outs.get("report"), text)
        _publish(outs.get("per_story"), "".join(json.dumps(p) + "\n" for p in per_story))
    return 0


def _outputs(args) -> dict:
    """{"report" | "per_story" | "samples": its Output} for the files asked for, each identified
    by what it depends on."""
    from jaxlm.outputs import Output, file_fingerprint

    if args.stories:
        source = {"stories": file_fingerprint(args.stories), "field": args.field}
    else:
        source = _sampling_identity(args)
    names = {"names": [_names_fingerprint(s) for s in args.names],
             "english_top": args.english_top}  # fmt: skip
    wanted = {
        "report": (args.out, "--out", {**source, **names, "resamples": args.resamples,
                                       "seed": args.seed}),
        "per_story": (args.per_story, "--per-story", {**source, **names}),
        "samples": (args.samples_out, "--samples-out", source),
    }  # fmt: skip
    return {
        k: Output(path, kind=f"artifacts-{k.replace('_', '-')}", identity=ident, directory=False,
                  overwrite=args.overwrite, flag=flag)
        for k, (path, flag, ident) in wanted.items() if path
    }  # fmt: skip


def _sampling_identity(args) -> dict:
    from jaxlm.checkpoint import model_identity
    from jaxlm.outputs import file_fingerprint
    from jaxlm.tokenizer import tokenizer_sha256

    model = model_identity(args.checkpoint)
    tok = tokenizer_sha256(args.tokenizer) if args.tokenizer else model.get("tokenizer_sha256")
    prompts = file_fingerprint(args.prompts) if args.prompts else None
    return {"model": model, "tokenizer_sha256": tok, "n": args.n, "prompts": prompts,
            "field": args.field if args.prompts else None, "max_new_tokens": args.max_new_tokens,
            "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
            "batch_size": args.batch_size}  # fmt: skip


def _names_fingerprint(spec: str) -> dict:
    from jaxlm.eval.wordlists import parse_names_spec
    from jaxlm.outputs import file_fingerprint

    side, path, column = parse_names_spec(spec)
    return {"side": side, "column": column, **file_fingerprint(path)}


def _publish(out, text: str) -> None:
    if out is not None and not out.done:
        out.tmp.write_text(text, encoding="utf-8")
        out.publish()


def _sample(args, samples_out) -> tuple[list[str], dict]:
    from jaxlm.checkpoint import load_model
    from jaxlm.eval.samples import load_prompts, sample_stories
    from jaxlm.generate import SamplingConfig
    from jaxlm.store import read_jsonl
    from jaxlm.tokenizer import load_recorded

    prompts = load_prompts(args.prompts, args.field) if args.prompts else None
    n = args.n if args.n is not None else len(prompts) if prompts else 48
    source = {"checkpoint": args.checkpoint, "tokenizer": args.tokenizer, "n": n,
              "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed,
              "batch_size": args.batch_size}  # fmt: skip
    if samples_out is not None and samples_out.done:  # sampled already with these settings
        return [r["text"] for r in read_jsonl(samples_out.path)], source
    model, info = load_model(args.checkpoint)
    tok = load_recorded(info, args.tokenizer, vocab_size=model.cfg.vocab_size, required=True)
    source["tokenizer"] = args.tokenizer or info.tokenizer
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k)
    stories = sample_stories(model, tok, n, prompts, max_new_tokens=args.max_new_tokens,
                             sampling=sampling, seed=args.seed,
                             batch_size=args.batch_size)  # fmt: skip
    begin = prompts or [""]
    _publish(samples_out, "".join(
        json.dumps({"prompt": begin[i % len(begin)], "text": s}, ensure_ascii=False) + "\n"
        for i, s in enumerate(stories)))  # fmt: skip
    return stories, source
