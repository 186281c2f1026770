"""`jaxlm train`: parse flags into a TrainConfig and call jaxlm.train.train."""

from __future__ import annotations

import argparse
import json

from jaxlm.errors import UserError
from jaxlm.train.sections import PREEMPTED_EXIT, parse_data_arg


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain or continue pre-training (resumes in --workdir)",
        epilog=f"Exit status: 0 done, 2 bad input, {PREEMPTED_EXIT} stopped by SIGTERM after "
        "saving (rerun to resume).",
    )
    p.add_argument("--config", help="YAML overlay on the TrainConfig defaults")
    p.add_argument("--workdir", required=True, help="checkpoints, metrics and plots go here")
    p.add_argument(
        "--data",
        action="append",
        metavar="DATADIR[:WEIGHT]",
        help="training data (repeat to mix); replaces data.sources",
    )
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--checkpoint-every", type=int)
    p.add_argument("--preset", help="model preset (model.preset)")
    p.add_argument("--init-from", help="continual pre-training: weights of this model or workdir")
    p.add_argument(
        "--overwrite", action="store_true", help="start over in a --workdir of other settings"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other config field, e.g. --set optim.lr=1e-4",
    )
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from jaxlm import overlay
    from jaxlm.train.lm import TrainConfig, load_config, train
    from jaxlm.train.metrics_log import log_to_stderr

    over: list[dict] = [overlay.parse_override(s, TrainConfig) for s in args.set]
    flags = {}
    if args.data:
        flags["data"] = {"sources": [parse_data_arg(d) for d in args.data]}
    if args.steps is not None:
        flags["steps"] = args.steps
    if args.batch_size is not None:
        flags["batch_size"] = args.batch_size
    if args.checkpoint_every is not None:
        flags["checkpoint"] = {"every": args.checkpoint_every}
    if args.preset:
        flags["model"] = {"preset": args.preset}
    if args.init_from:
        flags["init_from"] = args.init_from
    cfg = load_config(args.config, [flags, *over])
    log_to_stderr()
    result = train(cfg, args.workdir, overwrite=args.overwrite)
    if not result:
        raise UserError("training produced no result")
    print(json.dumps({k: v for k, v in result.items() if k != "data_crc"}))
    # stopped by SIGTERM after a clean save: not finished, so wrappers (tpu/babysit.py, the demo)
    # run the same command again, which resumes
    return PREEMPTED_EXIT if result.get("preempted") else 0
