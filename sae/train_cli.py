"""`jaxlm-sae train`: parse flags into an SAETrainConfig and call sae.train.train."""

from __future__ import annotations

import argparse
import json


def data_arg(text: str) -> dict:
    """DATADIR or DATADIR:WEIGHT -> {"path", "weight"}; a path with a colon and no weight stays."""
    path, sep, weight = text.rpartition(":")
    try:
        return {"path": path, "weight": float(weight)} if sep and path else {"path": text}
    except ValueError:
        return {"path": text}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a sparse autoencoder on a model's MLP activations")
    p.add_argument("--model", help="jaxlm model dir, training workdir or HF dir (model.path)")
    p.add_argument("--layer", type=int, help="MLP layer to read (model.layer)")
    p.add_argument(
        "--data", action="append", metavar="DATADIR[:WEIGHT]", help="repeat to mix; data.sources"
    )
    p.add_argument("--out", required=True, help="the SAE (SAELens layout), checkpoints, metrics")
    p.add_argument("--config", help="YAML overlay on the SAETrainConfig defaults")
    p.add_argument("--architecture", help="standard, topk, batchtopk or jumprelu")
    p.add_argument("--training-tokens", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any other field, e.g. --set sae.l1_coefficient=5")  # fmt: skip
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jaxlm import overlay
    from jaxlm.metrics_log import log_to_stderr
    from sae.train import SAETrainConfig, load_config, train

    flags: dict = {}
    if args.model is not None:
        flags.setdefault("model", {})["path"] = args.model
    if args.layer is not None:
        flags.setdefault("model", {})["layer"] = args.layer
    if args.data:
        flags["data"] = {"sources": [data_arg(d) for d in args.data]}
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
    result = train(cfg, args.out)
    print(json.dumps({"out": args.out, **result}))
    return 0
