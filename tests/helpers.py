"""Shared test helpers: tiny learnable image folders and running entry points as subprocesses.

Every helper module of the suite lives here, at tests/ (conftest.py puts this folder on sys.path):
helpers.py, dirty_data.py, wandb_records.py, resume_runs.py, and ddp_balanced_probe.py (a script
run under `accelerate launch`). Tests are in tests/unit/ (in-process) and tests/e2e/ (entry scripts
as subprocesses, `accelerate launch`, whole trainings)."""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
ACCELERATE = str(Path(sys.executable).with_name("accelerate"))

# Three classes a tiny CNN separates in a few steps: which color channel dominates, plus noise.
COLORS = {"red": 0, "green": 1, "blue": 2}


def make_image(rng: np.random.Generator, channel: int, size: int = 16) -> Image.Image:
    pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
    pixels[..., channel] = rng.integers(150, 256, size=(size, size), dtype=np.uint8)
    return Image.fromarray(pixels)


def make_image_folder(root: Path, per_class: int = 12, classes=tuple(COLORS), layout: str = "class-folders",
                      seed: int = 0, size: int = 16) -> Path:
    """`class-folders`: root/<class>/*.png; `split-folders`: root/train/<class>, root/val/<class>."""
    rng = np.random.default_rng(seed)
    splits = {"": per_class} if layout == "class-folders" else {"train": per_class, "val": max(2, per_class // 3)}
    for split, count in splits.items():
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                make_image(rng, COLORS.get(name, hash(name) % 3), size).save(folder / f"{name}_{i:03d}.png")
    return root


# The overrides of a multi-label run on make_multilabel_folder's labels.csv.
MULTILABEL = ("data.task=multilabel", "data.source=csv", "data.csv=labels.csv", "data.csv_label_column=labels")


def make_multilabel_folder(root: Path, count: int = 48, seed: int = 0, size: int = 16) -> Path:
    """Multi-label color images: each of the red, green and blue channels independently bright or dark
    (at least one bright), in root/images/, listed in root/labels.csv as `file,labels` ("red;blue")."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = ["file,labels"]
    for i in range(count):
        on = rng.random(3) < 0.5
        if not on.any():
            on[rng.integers(3)] = True
        pixels = rng.integers(0, 90, size=(size, size, 3), dtype=np.uint8)
        for channel in np.flatnonzero(on):
            pixels[..., channel] = rng.integers(150, 256, size=(size, size), dtype=np.uint8)
        name = f"images/img_{i:03d}.png"
        Image.fromarray(pixels).save(root / name)
        lines.append(f"{name},{';'.join(c for c, k in COLORS.items() if on[k])}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def run_env(**extra: str) -> dict[str, str]:
    """The environment of every subprocess test: CPU only, by environment rather than by luck. On
    a machine with GPUs, a 2-process CPU-DDP launch would otherwise put its ranks on cuda:0 and
    cuda:1 ("invalid device ordinal" with one GPU), and exact comparisons would meet TF32 and
    cuDNN's nondeterminism. Tests that need CUDA run in-process and skip without it. Idle OpenMP
    threads sleep (OMP_WAIT_POLICY): a run's threads otherwise spin on cores the other tests need."""
    env = dict(os.environ)
    env.update({"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1",
                "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
                # Keep accelerate from reading a user's `accelerate config` file.
                "HF_HOME": env.get("HF_HOME_TESTS", "/tmp/imgtrain-tests-hf")})
    env.update(extra)
    return env


def run_script(script: str, *args: str, cwd: Path, launcher: tuple[str, ...] = (), timeout: int = 300,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run launch/<script> as a user would: `python launch/x.py ...` or `accelerate launch ... launch/x.py`."""
    cmd = [*(launcher or (PYTHON,)), str(REPO / "launch" / script), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or run_env())


def start_script(script: str, *args: str, cwd: Path, launcher: tuple[str, ...] = (),
                 env: dict | None = None) -> subprocess.Popen:
    """run_script started and not waited for: a reference run trains while the runs compared with it do
    (the suite's two workers leave a core idle whenever one waits on a single-threaded run)."""
    cmd = [*(launcher or (PYTHON,)), str(REPO / "launch" / script), *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env or run_env())


def finish_script(process: subprocess.Popen, timeout: int = 300) -> subprocess.CompletedProcess:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def free_port() -> int:
    """A TCP port nobody listens on now: each multi-process launch gets its own rendezvous port, so
    launches of tests running side by side (pytest -n 2) never meet on accelerate's default 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*flags: str) -> tuple[str, ...]:
    port = () if "--main_process_port" in flags else ("--main_process_port", str(free_port()))
    return (ACCELERATE, "launch", "--num_machines", "1", "--dynamo_backend", "no", *port, *flags)


def run_in_process(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run launch/<script> in this interpreter, as `python launch/<script> args` would run: its exit code,
    stdout and stderr as a CompletedProcess. For checks of bad input, which end before any training and
    need no fresh interpreter (one costs seconds of imports). Every entry script keeps real subprocess tests."""
    argv, path, old_cwd = sys.argv, list(sys.path), os.getcwd()
    threads = __import__("torch").get_num_threads()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = [str(REPO / "launch" / script), *args]
        sys.path.insert(0, str(REPO / "launch"))  # what `python launch/x.py` puts first
        os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.path[:] = argv, path
        os.chdir(old_cwd)
        __import__("torch").set_num_threads(threads)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if "accelerate.state" in sys.modules:  # process-wide singletons a run may have created
            reset_accelerate_state()
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())


def precision_config(images: Path, run_dir: Path, *extra: str):
    """A whole tiny in-process training without BatchNorm (so runtimes compare exactly) on `images`."""
    from trainer.assemble.run_config import load_config

    # On CPU whatever the machine has: the comparisons are exact to 1e-5, which TF32 matmuls and
    # cuDNN's algorithm choice on a GPU do not promise (accumulation measured 2.6e-5 there).
    return load_config(None, [f"data.root={images}", f"run.dir={run_dir}", "model.name=tiny_cnn_nobn",
                              "data.image_size=16", "data.num_workers=0", "data.augment=none", "optim.lr=0.01",
                              "runtime.device=cpu", *extra])


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; an in-process run after another starts from scratch."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
