#!/usr/bin/env python
"""The README's main job: the whole method on the built-in demo corpus (see jaxlm/demo.py).

    python scripts/pipeline.py --workdir runs/demo

Rerunning skips finished stages; an interrupted training stage resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import sys

from jaxlm.demo import Demo, DemoConfig
from jaxlm.errors import UserError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="runs/demo")
    p.add_argument("--n-translated", type=int, default=DemoConfig.n_translated)
    p.add_argument("--pretrain-config", default=DemoConfig.pretrain_config)
    p.add_argument("--cpt-config", default=DemoConfig.cpt_config)
    p.add_argument("--sae-config", default=DemoConfig.sae_config)
    p.add_argument("--samples", type=int, default=DemoConfig.n_samples)
    args = p.parse_args(argv)
    cfg = DemoConfig(n_translated=args.n_translated, pretrain_config=args.pretrain_config,
                     cpt_config=args.cpt_config, n_samples=args.samples,
                     sae_config=args.sae_config)  # fmt: skip
    try:
        r = Demo(args.workdir, cfg).run()
    except UserError as e:
        print(f"pipeline: error: {e}", file=sys.stderr)
        return 2
    s = r["samples"]
    print("\nDone.")
    print(f"  loss curves: {r['pretrain']['plot']}, {r['cpt']['plot']}")
    print(f"  samples:     {s['pretrain']['file']}, {s['cpt']['file']}")
    print(f"  HF exports:  {r['export']['pretrain']}, {r['export']['cpt']}")
    before, after = s["pretrain"]["english_name_share"], s["cpt"]["english_name_share"]
    print(f"  English-name share in samples: {before} after pretraining -> {after} after "
          "continual pre-training")  # fmt: skip
    print(f"  English-style dialogue share: {s['pretrain']['english_dialogue_share']} -> "
          f"{s['cpt']['english_dialogue_share']}")  # fmt: skip
    t = r["tsea"]
    print(f"  SAE features (layer {r['sae']['layer']}) promoting a token set beyond random "
          "directions, before -> after continual pre-training:")  # fmt: skip
    for name, v in t.items():
        if isinstance(v, dict):
            print(f"    {name:20s} {v['before']} -> {v['after']}")
    print(f"  TSEA report:  {t['report']}, plot {t['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
