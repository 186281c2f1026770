"""`jaxlm sae train | tsea | tsea-compare | dashboard`: step 5 of the method, thin over sae.

Registered into the one `jaxlm` tool by `jaxlm.cli` (the top layer); the analysis commands live
next to their code in `sae.analysis.cli` and join the same `sae` group.
"""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `sae` and its subcommands."""
    from sae import eval_cli
    from sae.analysis import cli as analysis_cli

    group = sub.add_parser("sae", help="sparse autoencoders on MLP activations, and their analysis")
    gsub = group.add_subparsers(dest="sae_command", required=True)
    _register_train(gsub)
    eval_cli.register(gsub)  # eval, ablate
    analysis_cli.register(gsub)


def _register_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a sparse autoencoder on a model's MLP activations")
    p.add_argument("--model", help="jaxlm model dir, training workdir or HF dir (model.path)")
    p.add_argument("--layer", type=int, help="MLP layer to read (model.layer)")
    p.add_argument(
        "--layers",
        metavar="N,N,...|all",
        help="one SAE per layer from one forward pass, each into OUT/layer-N (model.layers)",
    )
    p.add_argument(
        "--data", action="append", metavar="DATADIR[:WEIGHT]", help="repeat to mix; data.sources"
    )
    p.add_argument(
        "--eval-data",
        action="append",
        metavar="DATADIR",
        help="evaluate the trained SAE on these held-out rows instead of the training sources' "
        "(repeat per source; eval.data)",
    )
    p.add_argument("--out", required=True, help="the SAE (SAELens layout), checkpoints, metrics")
    p.add_argument("--config", help="YAML overlay on the SAETrainConfig defaults")
    p.add_argument("--architecture", help="standard, topk, batchtopk or jumprelu")
    p.add_argument("--training-tokens", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out made with other settings")  # fmt: skip
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other field, e.g. --set sae.l1_coefficient=5")  # fmt: skip
    p.set_defaults(func=cmd_train)


def _parse_layers(text: str) -> str | list[int]:
    """`--layers 0,1,3` or `--layers all`."""
    if text.strip() == "all":
        return "all"
    try:
        layers = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        layers = []
    if not layers:
        raise UserError(f"--layers {text!r}: expected comma-separated layer numbers, or all")
    return layers


def cmd_train(args) -> int:
    from jaxlm import overlay
    from jaxlm.train.metrics_log import log_to_stderr
    from jaxlm.train.sections import PREEMPTED_EXIT, parse_data_arg
    from sae.train import SAETrainConfig, load_config, train

    flags: dict = {}
    if args.layer is not None and args.layers is not None:
        raise UserError("--layer N trains one SAE, --layers N,N,... one per layer: pass one")
    if args.layer is not None:  # the flag wins over a config's model.layers, and vice versa
        flags["model"] = {"layer": args.layer, "layers": []}
    if args.layers is not None:
        flags["model"] = {"layer": 0, "layers": _parse_layers(args.layers)}
    if args.model is not None:
        flags.setdefault("model", {})["path"] = args.model
    if args.data:
        flags["data"] = {"sources": [parse_data_arg(d) for d in args.data]}
    if args.eval_data:
        flags["eval"] = {"data": list(args.eval_data)}
    if args.architecture:
        flags["sae"] = {"architecture": args.architecture}
    if args.training_tokens is not None:
        flags.setdefault("data", {})["training_tokens"] = args.training_tokens
    if args.checkpoint_every is not None:
        flags["checkpoint"] = {"every": args.checkpoint_every}
    cfg = load_config(
        args.config, [flags, *(overlay.parse_override(s, SAETrainConfig) for s in args.set)]
    )
    log_to_stderr()
    result = train(cfg, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": args.out, **result}))
    # stopped by SIGTERM after a clean save: not finished, so wrappers rerun it (it resumes)
    return PREEMPTED_EXIT if result.get("preempted") else 0
