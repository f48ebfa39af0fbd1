"""Fine-tune an image classifier from one TOML config.

    # CPU or one GPU, one process
    python launch/train.py --config configs/demo.toml
    # any config, any key overridden on the command line (typed by the schema)
    python launch/train.py --config configs/regnet.toml data.root=/path/to/images train.epochs=3
    # several CPU processes on one machine: real DDP over gloo. Use --multi_gpu even without a GPU
    # (the trainer tells Accelerate cpu=True); `accelerate launch --cpu --num_processes 2` starts only one.
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        launch/train.py --config configs/demo.toml
    # several GPUs on one machine (DDP)
    accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision no --dynamo_backend no \\
        launch/train.py --config configs/regnet.toml data.root=...
    # mixed precision from the launcher (or train.precision=bf16|fp16 in the config)
    accelerate launch --multi_gpu --num_processes 4 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \\
        launch/train.py --config configs/regnet.toml data.root=...
    # several machines: run on each, with its own --machine_rank
    accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --main_process_ip 10.0.0.1 --main_process_port 29500 \\
        --num_processes 8 --mixed_precision no --dynamo_backend no launch/train.py --config configs/regnet.toml data.root=...
    # several machines under SLURM (see the script's header)
    sbatch launch/slurm_train.sbatch configs/regnet.toml data.root=/shared/images run.dir=/shared/runs/r1
    # one process driving all visible GPUs with nn.DataParallel
    python launch/train.py --config configs/regnet.toml runtime.parallel=dp data.root=...

    # continue a run that was killed or preempted, from its newest complete checkpoint
    python launch/train.py --config configs/demo.toml run.resume=auto

Bad input (unknown key, wrong type, missing folder, unknown model) ends with one line on stderr
and exit code 2, before anything is written. SIGTERM or SIGINT (a cluster's preemption notice,
Ctrl-C) finishes the current step, writes a checkpoint and exits with code 75; run the same
command with run.resume=auto to continue.
"""

from __future__ import annotations

import os

# The first instruction: a launcher killed while this rank starts is noticed (see die_with_launcher).
FIRST_PARENT = os.getppid()

import argparse  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from cli import config_parser, parse_config_args, run_main  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = config_parser(__doc__)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--keys", action="store_true", help="list every config key with its default and exit")
    return parse_config_args(parser, argv)


def main() -> int:
    from trainer.files.launcher_death import die_with_launcher

    # Before torch is imported and the process group is up: a rank never outlives its launcher.
    die_with_launcher(FIRST_PARENT)
    # Parsed first, torch imported last: --help, --keys, --print-config and bad input answer at once.
    args = parse_args()
    if args.keys:
        from configs.schema import describe_keys

        print(describe_keys())
        return 0
    from trainer.assemble.run_config import load_config

    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(cfg.to_toml())
        return 0
    from data.folders import data_root

    data_root(cfg.data)  # a mistyped data.root answers now, not after the training imports
    from trainer.fit.loop import train
    from trainer.fit.signals import Preempted

    try:
        train(cfg)
    except Preempted:
        # The checkpoint is complete; what is left is exiting. Another SIGTERM now (torch elastic
        # sends one to every rank once the first has exited) would turn exit 75 into a kill.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise
    except RuntimeError as e:
        raise _peer_fault(e) or e
    return 0


def _peer_fault(error: RuntimeError) -> Exception | None:
    """A collective that failed because another process stopped answering or died: one line, said
    by one process (the lowest rank still answering), instead of a torch traceback from each."""
    from configs.errors import TrainingFailed
    from trainer.assemble.process_group import peer_fault, speaks_for_the_group

    line = peer_fault(error)
    if line is None:
        return None
    if speaks_for_the_group() and os.environ.get("RANK", "0") != "0":  # run_main prints rank 0's
        print(f"error: {line}", file=sys.stderr, flush=True)
    return TrainingFailed(line)


if __name__ == "__main__":
    run_main(main)
