"""Search LR policies and augmentations with Ray Tune; the best trials become members.

    python jobs/search.py --config configs/search/resnet-lr-aug.yaml
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/search.py --config configs/search/resnet-lr-aug.yaml

The config is an ensemble config with a `search:` section: its members are the base
members searched over (one architecture, or a family as a grid). Ends with the trials
chosen two ways (top-k by own error, greedy by marginal gain to the ensemble) and a runs
file of the greedy choice that `ensemble.evaluate` reads and an ensemble config imports.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python jobs/search.py` from a bare checkout

from orchestrator.base.errors import exit_on_user_error  # noqa: E402
from orchestrator.base.outages import exit_on_outage  # noqa: E402
from orchestrator.drivers import search_job as job


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="ensemble config YAML with a search: section")
    p.add_argument("--runs", default="search-runs.yaml", help="where to write the chosen members (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, space and data, then stop")
    return p.parse_args(argv)


@exit_on_user_error
@exit_on_outage(lambda: "Kept: every trial's latest checkpoint in the job's storage.")
def main(argv=None) -> int:
    args = parse_args(argv)

    cfg, bases = job.load_and_check(args.config)
    if args.dry_run:
        print(f"search {cfg.name}: {len(bases)} base member(s), {len(cfg.search.space)} searched fields, "
              f"{cfg.search.scheduler}, {cfg.search.num_samples} samples each: config OK")
        return 0
    start = time.time()
    out = job.run(cfg, bases, args.config, args.runs)
    if out["choice"]:
        where = args.runs if "://" in args.runs else os.path.abspath(args.runs)  # an s3:// URL stays one
        print(f"\nwrote {where} in {(time.time() - start) / 60:.1f} min")
    return 0 if out["choice"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
