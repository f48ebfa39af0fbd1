"""Hyperparameter search: every trial a real run of launch/train.py, pruned by its per-epoch metric.

    # one machine: 20 trials of the demo (the study file is runs/search/study.journal)
    python launch/search.py --config configs/demo.toml --space benchmarks/search_demo_space.toml \\
        --trials 20 --out runs/search
    # two drivers on one machine sharing the study: start the same command twice; 20 trials in all
    python launch/search.py --config configs/demo.toml --space S.toml --trials 20 --out runs/search &
    python launch/search.py --config configs/demo.toml --space S.toml --trials 20 --out runs/search &
    # each trial a 2-process DDP run (CPU DDP here; with GPUs e.g. --launch "--multi_gpu --num_processes 4")
    python launch/search.py --config configs/demo.toml --space S.toml --trials 8 --out runs/search \\
        --launch "--multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
    # several machines: one study in shared storage, the same command on each machine
    python launch/search.py ... --out /shared/search --storage /shared/search/study.journal
    python launch/search.py ... --out /shared/search --storage postgresql://user:pw@db/optuna --study demo
    # the dashboard, on the study file
    optuna-dashboard runs/search/study.journal

The space file (TOML) names the keys to vary (see docs/search.md):

    metric = "val_acc"
    [params]
    "optim.lr" = { low = 1e-4, high = 3e-2, log = true }
    "train.epochs" = { low = 2, high = 6 }
    "data.augment" = { choices = ["standard", "crop", "trivialaugment"] }

--trials is the study's total over all its drivers. Each trial runs in --out DIR/trial-NNNN (its
output in DIR/logs/); at the end DIR/trials.csv lists every trial, DIR/best.toml holds the best
trial's resolved config (`python launch/train.py --config DIR/best.toml` trains it again), and
DIR/*.png show the study. A driver killed (even with SIGKILL) is started again with the same
command: the study goes on, and the trial it was running resumes from its checkpoint. Bad input
(a space key the config does not have, a value the schema refuses, an empty range) is one `error:`
line and exit 2 before any trial; SIGTERM or Ctrl-C stops the running trial cleanly and exits 75.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli import config_parser, output_folder, parse_config_args, run_main


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--space", required=True, help="TOML file: [params] to vary, metric, pruner")
    parser.add_argument("--trials", type=int, required=True, help="the study's total number of trials")
    parser.add_argument("--out", required=True, help="the study folder: study file, trial-NNNN run folders, results")
    parser.add_argument("--storage", help="a journal file (shared file system) or a database URL "
                                          "(sqlite:///f.db, postgresql://...); default DIR/study.journal")
    parser.add_argument("--study", default="", help="the study's name in the storage (default: the --out folder's name)")
    parser.add_argument("--launch", default="", help='`accelerate launch` arguments for each trial, in quotes, '
                                                     'e.g. "--multi_gpu --num_processes 2"')
    parser.add_argument("--seed", type=int, help="the sampler's seed (default: random; give each driver its own)")
    parser.add_argument("--stale-after", type=float, default=120.0,
                        help="seconds without a heartbeat after which another machine's trial is retried")
    return parse_config_args(parser, argv)


def main() -> int:
    # Parsed first, Optuna imported after: --help and a bad command line answer at once.
    args = parse_args()
    output_folder(args.out, "--out")
    import optuna

    from trainer.search.driver import SearchOptions, search
    from trainer.search.trial_run import parse_launch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the driver prints its own table
    return search(SearchOptions(config=args.config, space=args.space, trials=args.trials, out_dir=Path(args.out),
                                overrides=args.overrides, storage=args.storage, study_name=args.study,
                                launch_args=parse_launch(args.launch), seed=args.seed,
                                stale_after=args.stale_after))


if __name__ == "__main__":
    run_main(main)
