"""Same result on 1 process, 2 DDP processes on one machine, and 2 "machines" on 127.0.0.1 started
by the SLURM batch script; and a CSV listing the folder's files trains bitwise like the folder itself
under 2-process DDP.

Real `accelerate launch` subprocesses on CPU (DDP over gloo). The model has no BatchNorm, the
global batch is the same (16 = 16 x 1 = 8 x 2), the data has no augmentation, so the runs may
differ only by floating-point summation order in the gradient all-reduce. The 1-process reference
trains in-process: what is tested is the launches compared with it.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

from helpers import ACCELERATE, REPO, free_port, make_image_folder, run_env, run_in_process
from trainer.files.model_file import read_metadata

EPOCHS = 3
# fp32 round-off of a mean over 16 samples computed as (8 + 8) / 2 instead, over 9 optimizer steps.
WEIGHT_ATOL = 1e-5


def _overrides(root, run_dir, batch_size):
    return [f"data.root={root}", f"run.dir={run_dir}", "model.name=tiny_cnn_nobn", "data.image_size=16",
            f"data.batch_size={batch_size}", "data.num_workers=0", f"train.epochs={EPOCHS}", "data.augment=none",
            "optim.lr=0.01", "optim.scheduler=cosine", "optim.warmup_epochs=1", "train.precision=no"]


def _launch(flags, overrides, cwd):
    port = [] if "--main_process_port" in flags else ["--main_process_port", str(free_port())]
    cmd = [ACCELERATE, "launch", *flags, *port, "--mixed_precision", "no", "--dynamo_backend", "no",
           str(REPO / "launch" / "train.py"), *overrides]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=run_env())


def _finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    # split-folders: 48 train images (3 global batches of 16), 15 val images, which 2 processes
    # cannot split evenly (8 + 7): the padding of the last batch must not be counted.
    return make_image_folder(tmp_path_factory.mktemp("data") / "images", per_class=16, layout="split-folders")


@pytest.fixture(scope="module")
def one_process(images, tmp_path_factory):
    """The reference: the same training in one process, in this interpreter (`accelerate launch` with
    one process is test_sources_train.py's)."""
    run_dir = tmp_path_factory.mktemp("one") / "run"
    result = run_in_process("train.py", *_overrides(images, run_dir, 16), cwd=run_dir.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture(scope="module")
def two_processes(images, tmp_path_factory, request):
    """One 2-process DDP run on this machine (8 per process): its run folder and its stdout. The
    reference trains meanwhile."""
    run_dir = tmp_path_factory.mktemp("two") / "run"
    proc = _launch(["--multi_gpu", "--num_machines", "1", "--num_processes", "2"], _overrides(images, run_dir, 8),
                   run_dir.parent)
    request.getfixturevalue("one_process")
    out, _ = _finish(proc)
    return run_dir, out


def _assert_same_training(run_dir, reference):
    ours, theirs = _history(run_dir), _history(reference)
    assert len(ours) == len(theirs) == EPOCHS
    for a, b in zip(ours, theirs):
        # The learning-rate curve is stepped per optimizer step, not per process.
        assert a["lr"] == b["lr"]
        assert a["optimizer_steps"] == b["optimizer_steps"] == 3
        assert a["train_images"] == b["train_images"] == 48
        assert a["val_images"] == b["val_images"] == 15  # every validation image exactly once
        assert a["val_acc"] == b["val_acc"]
        for key in ("train_loss", "val_loss", "train_acc"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7)
    ours_w, theirs_w = load_file(run_dir / "last.safetensors"), load_file(reference / "last.safetensors")
    assert ours_w.keys() == theirs_w.keys()
    worst = max((ours_w[k] - theirs_w[k]).abs().max().item() for k in ours_w)
    assert worst < WEIGHT_ATOL, f"weights differ by {worst}"


def test_two_process_cpu_ddp_matches_one_process(two_processes, one_process):
    run_dir, out = two_processes
    _assert_same_training(run_dir, one_process)
    # One run folder, one set of files: only the main process writes, so the 2-process folder
    # holds exactly what the 1-process run wrote.
    files = sorted(p.name for p in run_dir.iterdir())
    assert files == sorted(p.name for p in one_process.iterdir())
    assert {"best.safetensors", "config.toml", "last.safetensors", "metrics.jsonl"} <= set(files)
    assert out.count("runtime  device") == 1 and out.count("best.safetensors holds") == 1
    assert "2 process(es)" in out and "= 16 global" in out and "ddp (gloo)" in out
    # Two processes on this machine share its cores.
    assert f"{max(1, len(os.sched_getaffinity(0)) // 2)} CPU thread(s) per process" in out
    meta = read_metadata(run_dir / "last.safetensors")
    assert meta["runtime"] == {"num_processes": 2, "device": "cpu", "precision": "no", "global_batch_size": 16}
    assert meta["num_processes"] == "2" and meta["global_batch_size"] == "16"


def test_slurm_batch_script_launches_two_machines_that_train_a_csv_listing_like_the_folder(
        images, two_processes, one_process, tmp_path):
    # Stand-ins for SLURM's tools: srun runs the node command once per node with its SLURM_NODEID,
    # as on two nodes (each node's stdout to its own file), and scontrol names the first node. The
    # script runs `accelerate launch --num_machines 2 --machine_rank $SLURM_NODEID ...` on each.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (bin_dir / "srun").write_text("#!/bin/bash\nshift  # --kill-on-bad-exit=1\n"
                                  "SLURM_NODEID=0 \"$@\" > node-0.out & a=$!\nSLURM_NODEID=1 \"$@\" > node-1.out & b=$!\n"
                                  "wait $a && wait $b\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    # The folder's own files, listed with their class and split in columns named unlike the defaults.
    listing = tmp_path / "labels.csv"
    with open(listing, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("path", "breed", "subset"))
        for p in sorted(images.rglob("*.png")):
            split, label = p.relative_to(images).parts[:2]
            writer.writerow((p.relative_to(images).as_posix(), label, split))
    run_dir = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text("[train]\nprecision = \"no\"\n")
    env = run_env(PATH=f"{bin_dir}:{os.path.dirname(ACCELERATE)}:{os.environ['PATH']}", SLURM_NNODES="2",
                  SLURM_JOB_NODELIST="node[1-2]", GPUS_PER_NODE="1", MAIN_PORT=str(free_port()))
    # One thread per process, as each of the two processes on one machine has: the same arithmetic,
    # so the CSV run and the folder's run compare bit for bit.
    csv_source = ["data.source=csv", f"data.csv={listing}", "data.csv_file_column=path",
                  "data.csv_label_column=breed", "data.csv_split_column=subset", "runtime.cpu_threads=1"]
    result = subprocess.run(["bash", str(REPO / "launch" / "slurm_train.sbatch"), str(config),
                             *_overrides(images, run_dir, 8), *csv_source], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out0, out1 = (tmp_path / "node-0.out").read_text(), (tmp_path / "node-1.out").read_text()
    assert out0.count("machines 2, parallel ddp") == 1 and "(csv): 3 classes, 48 train / 15 val images" in out0
    assert "runtime" not in out1 and "epoch" not in out1  # machine 1 neither prints nor writes
    assert read_metadata(run_dir / "best.safetensors")["runtime"]["num_processes"] == 2
    _assert_same_training(run_dir, one_process)
    # Bit for bit like the folder's 2-process run on one machine.
    folder = two_processes[0]
    keys = ("train_loss", "val_loss", "val_acc")
    assert [{k: r[k] for k in keys} for r in _history(run_dir)] == [{k: r[k] for k in keys} for r in _history(folder)]
    ours, theirs = load_file(run_dir / "last.safetensors"), load_file(folder / "last.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
