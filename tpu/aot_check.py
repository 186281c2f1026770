"""Compile a train step ahead of time for a named TPU topology; print one JSON report.

    python tpu/aot_check.py --topology v5e-8 --config configs/pretrain.yaml \\
        --set model.preset=ts-33m \\
        --global-batch 512

Needs libtpu (`pip install "jax[tpu]"`), not a TPU; runs fine with JAX_PLATFORMS=cpu. Exits 1
when the step does not fit in one chip's HBM, 2 on a usage error (including a batch that does
not divide over the mesh). `--set section.key=value` overrides the config, e.g.
`--set model.preset=ts-33m --set model.dtype=bfloat16`. `--builder MODULE:FN` or
`--builder path/to/file.py:FN` compiles any `FN(mesh) -> (jitted_fn, abstract_args)` instead
of jaxlm's train step.

`--sae-latents S` compiles the SAE trainer's step instead (sae/aot.py): `--config` is then an SAE
train config (configs/sae/default.yaml; default: SAELens' defaults) and `--set` overrides it:

    python tpu/aot_check.py --topology v5e-8 --sae-d-in 3072 --sae-latents 24576 \\
        --sae-batch 4096 --sae-architecture topk --set sae.k=64
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path

# Compiling needs libtpu, never a TPU backend: keep jax on CPU so libtpu loads compile-only.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

if __package__ in (None, ""):  # run as a file: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxlm.aot import TOPOLOGIES, BuildFn, compile_for_topology  # noqa: E402
from jaxlm.errors import UserError, exit_code  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command-line flags."""
    p = argparse.ArgumentParser(prog="tpu/aot_check.py", description=__doc__.splitlines()[0])
    p.add_argument("--topology", required=True, choices=sorted(TOPOLOGIES))
    p.add_argument("--config", help="train config YAML; default: TrainConfig's defaults")
    p.add_argument("--global-batch", type=int, default=None, help="sequences per step, all chips")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted config override, repeatable")  # fmt: skip
    p.add_argument("--data", type=int, default=1, help="mesh size of the data axis")
    p.add_argument("--tensor", type=int, default=1, help="mesh size of the tensor axis")
    p.add_argument("--builder", help="MODULE:FN or FILE.py:FN; FN(mesh) -> (jitted, args)")
    sae = p.add_argument_group("SAE step (sae/aot.py), chosen by --sae-latents")
    sae.add_argument("--sae-latents", type=int, help="d_sae: the SAE's latents")
    sae.add_argument("--sae-d-in", type=int, default=3072,
                     help="the SAE's input width (default 3072: ts-33m's MLP)")  # fmt: skip
    sae.add_argument("--sae-batch", type=int, help="activation rows per step (default: config's)")
    sae.add_argument("--sae-architecture", help="standard, topk, batchtopk, jumprelu (config's)")
    sae.add_argument("--sae-layers", type=int, default=1,
                     help="SAEs trained by one step, as with model.layers (default 1)")  # fmt: skip
    return p


def load_builder(spec: str) -> BuildFn:
    """Resolve `module:fn` or `path/to/file.py:fn` to the build callable."""
    target, _, name = spec.rpartition(":")
    if not target or not name:
        raise UserError(f"--builder {spec!r}: expected MODULE:FN or FILE.py:FN")
    if target.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(Path(target).stem, target)
        if file_spec is None or not Path(target).is_file():
            raise UserError(f"--builder: no such file {target}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(target)
    if not hasattr(module, name):
        raise UserError(f"--builder: {target} has no {name}")
    return getattr(module, name)


def train_step_builder(config: str | None, overrides: list[str], global_batch: int | None):
    """jaxlm's own train step as a build callable: the config's defaults, YAML, then --set."""
    try:
        from jaxlm.overlay import parse_override
        from jaxlm.train.lm import abstract_train_step, load_config
    except ImportError as e:
        raise UserError(f"jaxlm.train.lm.abstract_train_step is not available ({e})") from e
    cfg = load_config(config, [parse_override(o) for o in overrides])
    return lambda mesh: abstract_train_step(cfg, mesh, global_batch)


def sae_builder(args: argparse.Namespace) -> BuildFn:
    """The SAE trainer's step (sae/aot.py) for the --sae-* flags over --config and --set."""
    from jaxlm.overlay import parse_override
    from sae.aot import sae_config, sae_step_builder
    from sae.train import load_config

    if args.global_batch is not None:
        raise UserError("--global-batch is the LM step's; the SAE step's batch is --sae-batch")
    if args.sae_layers < 1:
        raise UserError(f"--sae-layers={args.sae_layers} must be >= 1")
    base = load_config(args.config, [parse_override(o) for o in args.set])
    cfg = sae_config(
        args.sae_d_in,
        args.sae_latents,
        args.sae_batch or base.data.train_batch_size_tokens,
        args.sae_architecture or base.sae.architecture,
        base,
    )
    return sae_step_builder(cfg, args.sae_layers)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (2 with one line on stderr for a usage error)."""
    args = build_parser().parse_args(argv)

    def run() -> int:
        if args.builder and args.sae_latents is not None:
            raise UserError("--builder and --sae-latents each choose the step: give one")
        if args.builder:
            build = load_builder(args.builder)
        elif args.sae_latents is not None:
            build = sae_builder(args)
        else:
            build = train_step_builder(args.config, args.set, args.global_batch)
        try:
            report = compile_for_topology(args.topology, build, data=args.data, tensor=args.tensor)
        except ValueError as e:  # shapes that do not divide over the mesh (UserError included)
            raise UserError(str(e).splitlines()[0]) from None
        print(report.to_json())
        return 0 if report.fits else 1

    return exit_code("aot_check", run)


if __name__ == "__main__":
    sys.exit(main())
