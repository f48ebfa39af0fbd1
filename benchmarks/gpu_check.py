"""The GPU claims in one command: the CUDA-only tests, throughput against the compute ceiling,
nvjpeg decode, data.batch_size = "auto", EMA under fp16 and gradient-checkpointing memory, each
measured on the GPU and summed up in one Markdown table.

    python benchmarks/gpu_check.py                          # one H100/H200: about 5 minutes, ./gpu_check.md
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.md   # through the device tool
    python benchmarks/gpu_check.py --only batch_auto,grad_ckpt                    # some steps again
    python benchmarks/gpu_check.py --device cpu --tiny      # the dry run the test suite runs: under a minute
    make gpu-check GPU_CHECK_ARGS="--out /tmp/gpu_check.md"

Steps, in order. Each runs in its own process group under its own time budget: one that overruns
is killed and reported as stopped (with the rows it had measured), and the rest still run.
  1  cuda_tests  the tests that skip here with "needs a CUDA GPU" / "needs two CUDA GPUs" (pytest -rs)
  2a throughput  benchmarks/throughput.py: timm/resnet50, bf16, batch 256, 224 px, 12800 photos;
                 channels_last needs no flag: runtime.channels_last = "auto" is on with CUDA, and
                 throughput.py's own rows follow the same rule
  2b nvjpeg      benchmarks/throughput.py: timm/resnet18 with data.decode = "cuda"
  3  batch_auto  data.batch_size = "auto" training timm/resnet50 at 224 px (fp32, random init): the
                 batch found, the search's peak memory and the peak of the training that followed
  4  ema_fp16    a short fp16 training with train.ema_decay: finite metrics and ema_val_* keys
  5  grad_ckpt   peak memory of one forward + backward (bf16, batch 64) with and without
                 runtime.grad_checkpointing, timm/resnet50 and timm/vit_base_patch16_224

Nothing is downloaded (random init, generated images; the GPU machine reaches no network). A step
that needs a package that is missing is skipped with a note (pytest for 1; matplotlib for the
training runs, which draw their plots); without scikit-learn, throughput.py writes generated photos
instead of its sample photos and says so. The table is rewritten after every step, so it holds
what was measured even if the whole command is killed; every step's output goes to the log beside
it (--out with .log). --device cpu also hides the GPU from every step (CUDA_VISIBLE_DEVICES=""),
so the CUDA-only steps report themselves skipped with "no CUDA".
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
GiB = 2**30


# ---- rows and steps ----


@dataclass
class Row:
    step: str
    measured: str
    figure: str
    verdict: str  # "ok", "failed: why" or "skipped: why"


def skipped(reason: str) -> str:
    return f"skipped: {reason}"


def failed(reason: str) -> str:
    return f"failed: {reason}"


@dataclass
class StepRun:
    """What a step's process is given, and where its rows go: the result file is rewritten after
    every row, so a step stopped at its budget still hands over what it had measured."""

    label: str
    device: str  # "cuda" or "cpu", as asked; cuda() says whether there is one
    tiny: bool
    work: Path
    result: Path
    rows: list[Row] = field(default_factory=list)

    def add(self, measured: str, figure: str, verdict: str = "ok") -> None:
        self.rows.append(Row(self.label, measured, figure, verdict))
        self.result.write_text(json.dumps([asdict(row) for row in self.rows], indent=1))
        print(f"[{self.label}] {measured}: {figure} -> {verdict}", flush=True)

    def cuda(self) -> bool:
        import torch

        return self.device == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class Step:
    label: str  # the step's number and name in the table
    name: str  # what --only takes
    budget_s: int
    needs: tuple[str, ...]  # importable packages without which the step is skipped
    run: Callable[[StepRun], None]


# ---- 1: the CUDA-only tests ----

CUDA_SKIP = "CUDA GPU"  # in the skip reasons "needs a CUDA GPU" and "needs two CUDA GPUs"


class CudaOnly:
    """pytest plugin: keep only the tests that skip without CUDA, found by their skip reason
    wherever the marker was written (on the test, a module-level name, pytestmark)."""

    @staticmethod
    def needs_cuda(item) -> bool:
        return any(CUDA_SKIP in mark.kwargs.get("reason", "") for mark in item.iter_markers("skipif"))

    def pytest_collection_modifyitems(self, config, items):
        config.hook.pytest_deselected(items=[item for item in items if not self.needs_cuda(item)])
        items[:] = [item for item in items if self.needs_cuda(item)]


def cuda_test_files() -> list[Path]:
    """Only the files that mention the skip reason are collected: collecting all of tests/ costs more
    than running the few tests."""
    return sorted(path for path in (ROOT / "tests").rglob("test_*.py")
                  if "skipif" in (text := path.read_text()) and CUDA_SKIP in text)


def junit_outcomes(path: Path) -> dict[str, list[str]]:
    """{"passed"|"failed"|"skipped": [test id or skip reason, ...], "missing": ["file needs package"]}
    from pytest's --junitxml file. A test file that cannot be imported for want of an optional
    package is "missing", not failed: the image lacks the package, the code is not at fault."""
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": [], "missing": []}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        tags = {child.tag: child for child in case}
        absent = re.search(r"No module named '(\w+)", tags["error"].text or "") if "error" in tags else None
        if not case.get("classname") and absent and absent.group(1) in OPTIONAL:  # a collection error
            outcomes["missing"].append(f"{case.get('name').rsplit('.', 1)[-1]}.py needs {absent.group(1)}")
        elif "failure" in tags or "error" in tags:
            outcomes["failed"].append(name)
        elif "skipped" in tags:
            outcomes["skipped"].append(tags["skipped"].get("message", "").removeprefix("Skipped: ") or name)
        else:
            outcomes["passed"].append(name)
    return outcomes


STALE = f"no test skips with {CUDA_SKIP!r} any more: update CUDA_SKIP in benchmarks/gpu_check.py"


def tests_verdict(outcomes: dict[str, list[str]], no_cuda: bool) -> str:
    if outcomes["failed"]:
        return failed(", ".join(outcomes["failed"]))
    if not any(outcomes.values()):
        return failed(STALE)
    if not outcomes["passed"]:
        return skipped("no CUDA" if no_cuda else "every CUDA-only test skipped")
    return "ok"


def cuda_tests(run: StepRun) -> None:
    files = cuda_test_files()
    what = f"CUDA-only tests in {', '.join(path.name for path in files)}"
    if not files:
        run.add("CUDA-only tests", "none found", failed(STALE))
        return
    import pytest

    xml = run.work / "cuda_tests.xml"
    os.chdir(ROOT)  # pyproject.toml's pytest settings
    code = pytest.main(["-q", "-rs", "-p", "no:cacheprovider", "--continue-on-collection-errors", f"--junitxml={xml}",
                        *map(str, files)], plugins=[CudaOnly()])
    if not xml.exists():
        run.add(what, f"pytest exit code {code}", failed("pytest wrote no results; see the log"))
        return
    outcomes = junit_outcomes(xml)
    reasons = sorted(set(outcomes["skipped"]))
    figure = (f"{len(outcomes['passed'])} passed, {len(outcomes['failed'])} failed, {len(outcomes['skipped'])} "
              f"skipped" + (f" ({'; '.join(reasons)})" if reasons else "")
              + "".join(f"; not collected: {why} (not installed)" for why in outcomes["missing"]))
    run.add(what, figure, tests_verdict(outcomes, run.device == "cpu" or not run.cuda()))


# ---- 2: throughput.py ----


def throughput(run: StepRun, settings: list[str], what: str) -> None:
    """throughput.py with these settings (--json: the rows as data), one table row per row."""
    if importlib.util.find_spec("matplotlib") is None:
        settings = [*settings, "--skip-trainer"]  # launch/train.py draws its plots with matplotlib
        run.add("our trainer", "not run", skipped("needs matplotlib (the trainer draws its plots)"))
    import runpy

    out = run.work / "throughput.json"
    script = BENCHMARKS / "throughput.py"
    sys.argv = [str(script), *settings, "--skip-cost", "--json", str(out)]
    runpy.run_path(str(script), run_name="__main__")  # as `python throughput.py ...`, in this step's process
    data = json.loads(out.read_text())
    s = data["settings"]
    run.add(what, f"{s['model']}, precision {s['precision']}, batch {s['batch']}, {s['image_size']} px, "
                  f"channels_last {'on' if data['channels_last'] else 'off'}, decode on {s['decode']}, "
                  f"{s['images']} {data['photos']} at {s['photo_size']}, {s['workers']} workers, on {data['device']}")
    for row in data["rows"]:
        run.add(row["name"], f"{row['images_per_sec']:,.0f} img/s = {row['x_ceiling']:.2f} x ceiling")


def tiny_throughput_settings() -> list[str]:
    # The ceiling and our pipeline, in this process alone: a nested launch/train.py and loader
    # workers would triple the dry run's time, and the tests run those many times over.
    return ["--model", "tiny_cnn", "--batch", "8", "--image-size", "32", "--precision", "no", "--images", "32",
            "--photo-size", "64x48", "--steps", "2", "--warmup", "1", "--workers", "0", "--skip-trainer",
            "--skip-timm"]


def throughput_resnet50(run: StepRun) -> None:
    settings = (tiny_throughput_settings() if run.tiny else
                ["--model", "timm/resnet50", "--batch", "256", "--image-size", "224", "--precision", "bf16",
                 "--images", "12800", "--workers", str(max(1, (os.cpu_count() or 2) - 1))])
    throughput(run, settings, "settings")


def throughput_nvjpeg(run: StepRun) -> None:
    if run.device != "cuda" or not run.cuda():
        run.add("data.decode = cuda (nvjpeg)", "not run", skipped("no CUDA"))
        return
    # 6400 photos: the question is whether nvjpeg feeds resnet18, not the issue's exact setting.
    throughput(run, ["--model", "timm/resnet18", "--batch", "256", "--image-size", "224", "--precision", "bf16",
                     "--images", "6400", "--workers", str(max(1, (os.cpu_count() or 2) - 1)), "--decode", "cuda"],
               "settings")


# ---- 3, 4: real trainings, in this process ----


def photo_folder(run: StepRun, count: int, photo_size: tuple[int, int]) -> Path:
    from throughput import make_folder  # benchmarks/ is on the path: the photos throughput.py writes

    return make_folder(run.work / "photos", count, photo_size)


def train_overrides(run: StepRun, folder: Path, workers: int) -> list[str]:
    return [f"data.root={folder}", f"run.dir={run.work / 'run'}", "model.pretrained=false",
            f"data.num_workers={workers}", "data.audit=off", "wandb.mode=disabled",
            f"runtime.device={'cuda' if run.cuda() else 'cpu'}"]


def batch_auto(run: StepRun) -> None:
    """The real path: train(cfg) with data.batch_size = "auto". The search is wrapped where the run
    assembly calls it, to read its peak memory apart from the training's."""
    import io

    import torch

    from trainer.assemble import run_parts
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    cuda = run.cuda()
    # More training images than fit in one batch: the search is capped at a process's share of them.
    model, size, count, workers = (("tiny_cnn", 16, 24, 0) if run.tiny else
                                   ("timm/resnet50", 224, 3072, min(8, os.cpu_count() or 1)))
    folder = photo_folder(run, count, (64, 48))
    found: dict = {}
    search = run_parts.resolve_batch_size  # AttributeError here: the assembly no longer calls it by this name

    def timed(try_step):
        def step(n: int) -> None:  # each probe in the log: an overrun still shows how far the search got
            started = time.perf_counter()
            try:
                try_step(n)
            finally:
                print(f"probe of {n}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
        return step

    def measured_search(cfg, accelerator, try_step, train_samples):
        started, printed = time.perf_counter(), io.StringIO()
        with contextlib.redirect_stdout(printed):
            search(cfg, accelerator, timed(try_step), train_samples)
        found.update(line=printed.getvalue().strip(), seconds=time.perf_counter() - started,
                     peak=torch.cuda.max_memory_allocated() if cuda else 0)
        print(found["line"], flush=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()  # from here on: the training with the batch found

    run_parts.resolve_batch_size = measured_search
    cfg = load_config(None, [*train_overrides(run, folder, workers), f"model.name={model}",
                             f"data.image_size={size}", "data.batch_size=auto", "train.epochs=1",
                             "train.precision=no"])
    train(cfg)
    # "batch size auto: found N per process (how)": how, without the list of sizes tried (in the log).
    how = found["line"].split("(", 1)[-1].rstrip(")").split("; tried")[0]
    what = f"data.batch_size=auto, {model} at {size} px, fp32: {how}"
    if not cuda:
        run.add(what, f"batch {cfg.data.batch_size}", skipped("no CUDA (the CPU default was used, as documented)"))
        return
    total = torch.cuda.get_device_properties(0).total_memory
    peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    run.add(what, f"batch {cfg.data.batch_size} (search {found['seconds']:.0f} s, its peak {found['peak'] / GiB:.1f} GiB); "
                  f"training peak {peak / GiB:.1f} GiB allocated, {reserved / GiB:.1f} GiB reserved, "
                  f"of {total / GiB:.1f} GiB", "ok" if "out of memory at" in found["line"] else
            "ok (the cap fit: no out-of-memory met)")


def ema_fp16(run: StepRun) -> None:
    from trainer.assemble.run_config import load_config
    from trainer.fit.loop import train

    model, size, count, batch, epochs, workers = (("tiny_cnn", 16, 24, 8, 1, 0) if run.tiny else
                                                  ("timm/resnet18", 64, 512, 64, 2, 4))
    folder = photo_folder(run, count, (80, 60))
    cfg = load_config(None, [*train_overrides(run, folder, workers), f"model.name={model}",
                             f"data.image_size={size}", f"data.batch_size={batch}", f"train.epochs={epochs}",
                             "train.precision=fp16", "train.ema_decay=0.99"])
    result = train(cfg)
    last = result.history[-1]
    numbers = {k: v for record in result.history for k, v in record.items() if isinstance(v, (int, float))}
    problems = [f"{k} = {v}" for k, v in numbers.items() if not math.isfinite(v)]
    problems += [f"no {k}" for k in ("ema_val_loss", "ema_val_acc") if k not in last]
    problems += [f"no {name}" for name in ("ema.safetensors", "best.safetensors")
                 if not (result.run_dir / name).exists()]
    skips = sum(record.get("skipped_steps", 0) for record in result.history)
    figure = (f"{len(result.history)} epoch(s); last: val_loss {last.get('val_loss', float('nan')):.3f}, "
              f"ema_val_loss {last.get('ema_val_loss', float('nan')):.3f}, "
              f"ema_val_acc {last.get('ema_val_acc', float('nan')):.3f}; {skips} fp16 steps skipped")
    if problems:
        verdict = failed("; ".join(problems))
    elif not run.cuda():
        verdict = skipped("no CUDA (fp16 fell back on CPU; the EMA keys are there and finite)")
    else:
        verdict = "ok"
    run.add(f"train.precision=fp16, train.ema_decay=0.99, {model} at {size} px, batch {batch}", figure, verdict)


# ---- 5: gradient checkpointing ----


def peak_memory(name: str, size: int, batch: int, checkpointing: bool, cuda: bool) -> tuple[int, int]:
    """(peak bytes allocated in one forward + backward under bf16 autocast, of which above the
    weights and the batch); (0, 0) on CPU, where the passes run in fp32 and nothing counts memory."""
    import gc

    import torch

    from models import build_classifier, enable_grad_checkpointing

    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    built = build_classifier(name, 10)
    if checkpointing:
        enable_grad_checkpointing(built)
    model = built.model.to(device).train()
    images = torch.randn(batch, 3, size, size, device=device)
    if cuda:  # as training runs it: runtime.channels_last = "auto" is on with CUDA
        model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), device=device)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else 0
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):  # CPUs without bf16 emulate it slowly
        loss = torch.nn.functional.cross_entropy(model(images), labels)
    loss.backward()
    peak = 0
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    del model, images, labels, loss
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return peak, peak - before


def grad_checkpointing(run: StepRun) -> None:
    import torch

    cuda = run.cuda()
    torch.backends.cudnn.benchmark = False  # the same algorithms (and workspaces) both ways
    # timm's test models: a ResNet and a ViT of 0.3 M parameters, the code paths of the real ones.
    cases = ((("timm/test_resnet", 32, 2), ("timm/test_vit", 160, 1)) if run.tiny else
             (("timm/resnet50", 224, 64), ("timm/vit_base_patch16_224", 224, 64)))
    for name, size, batch in cases:
        (plain, plain_act), (kept, kept_act) = (peak_memory(name, size, batch, on, cuda) for on in (False, True))
        what = f"forward+backward peak, {name} at {size} px, batch {batch}, {'bf16' if cuda else 'fp32'}"
        if not cuda:
            run.add(what, "both passes ran", skipped("no CUDA (peak memory is CUDA's)"))
            continue
        ratio = kept_act / plain_act
        run.add(what, f"without {plain / GiB:.2f} GiB (activations {plain_act / GiB:.2f}), with "
                      f"{kept / GiB:.2f} GiB ({kept_act / GiB:.2f}): activations x {ratio:.2f}",
                "ok" if ratio < 1 else failed("checkpointing saved no memory"))


STEPS = (
    Step("1 cuda_tests", "cuda_tests", 50, ("pytest",), cuda_tests),
    Step("2a throughput", "throughput", 140, ("timm",), throughput_resnet50),
    Step("2b nvjpeg", "nvjpeg", 75, ("timm",), throughput_nvjpeg),
    Step("3 batch_auto", "batch_auto", 120, ("timm", "matplotlib"), batch_auto),
    Step("4 ema_fp16", "ema_fp16", 40, ("timm", "matplotlib"), ema_fp16),
    Step("5 grad_ckpt", "grad_ckpt", 35, ("timm",), grad_checkpointing),
)
OPTIONAL = ("pytest", "timm", "matplotlib", "sklearn", "wandb", "onnx", "onnxruntime", "datasets")


# ---- the command: each step in its own process ----

# Imported once by the process every step is forked from (multiprocessing's forkserver): a step
# then starts in a fraction of a second instead of importing torch, timm and the trainer again
# (torch._dynamo: the first optimizer step imports it, for seconds). Importing them touches no CUDA
# (PYTORCH_NVML_BASED_CUDA_CHECK keeps torch.cuda.is_available fork-safe should one ask), so each
# step creates its own CUDA context as a fresh process would; fork_check proves it before the
# first step and falls back to fresh processes if not.
PRELOAD = ["numpy", "PIL.Image", "torch", "torch._dynamo", "torchvision", "timm", "accelerate", "matplotlib.figure",
           "pytest", "configs.schema", "data", "models", "trainer.fit.loop", "trainer.assemble.run_config"]


def environment_row() -> Row:
    """Versions and the GPU, read without importing torch here."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} missing"

    gpu = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True)
        gpu = "; ".join(query.stdout.strip().splitlines()) or "nvidia-smi: " + query.stderr.strip()[:80]
    missing = [name for name in OPTIONAL if importlib.util.find_spec(name) is None]
    figure = (f"Python {platform.python_version()}, {installed('torch')}, {installed('torchvision')}, "
              f"{installed('timm')}, {installed('accelerate')}; {os.cpu_count()} CPU cores; GPU: {gpu}")
    return Row("0 environment", "missing: " + (", ".join(missing) or "none"), figure, "ok")


def steps_environment(device: str, work: Path) -> dict[str, str]:
    """What every step runs under (set here before the first step's process exists)."""
    env = {"WANDB_MODE": "disabled", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "IMGTRAIN_AUDIT_DIR": str(work / "audit-cache"), "PYTORCH_NVML_BASED_CUDA_CHECK": "1",
           # The repository for the project's packages, benchmarks/ for throughput.py.
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(BENCHMARKS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def fork_check(device: str) -> None:
    """Fails in a process forked from the preloaded one if CUDA was initialized before the fork."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        torch.ones(1, device="cuda").sum().item()


def step_processes(device: str):
    """The multiprocessing context that starts the steps, and how (for the environment row)."""
    import multiprocessing

    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    check = context.Process(target=fork_check, args=(device,), name="fork_check")
    check.start()
    check.join(120)  # the preloading happens here: 10 s on a GPU machine, a minute on a slow, busy CPU
    if check.exitcode == 0:
        return context, "steps forked from one preloaded process"
    if check.exitcode is None:
        check.kill()
    return multiprocessing.get_context("spawn"), f"steps in fresh processes (the fork check ended {check.exitcode})"


def step_process(name: str, device: str, tiny: bool, work: str, result: str, log: str) -> None:
    """A step's process: its own session, so the budget's kill takes its loader workers and any
    subprocess with it; its output appended to the log."""
    os.setsid()
    out = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(out, 1)
    os.dup2(out, 2)
    step = next(s for s in STEPS if s.name == name)
    step.run(StepRun(step.label, device, tiny, Path(work), Path(result)))
    sys.stdout.flush()


def run_step(step: Step, args: argparse.Namespace, context, work: Path, log: Path) -> list[Row]:
    """The step in its own process, killed with everything it started at its budget. Rows: what it
    reported, plus a failed row if it did not end well."""
    missing = [name for name in step.needs if importlib.util.find_spec(name) is None]
    if missing:
        return [Row(step.label, "the step", "not run", skipped(f"needs {', '.join(missing)} (not installed)"))]
    result, folder = work / f"{step.name}.json", work / step.name
    folder.mkdir()
    with log.open("a") as out:
        out.write(f"\n===== {step.label} (budget {step.budget_s} s) =====\n")
    start = log.stat().st_size
    process = context.Process(target=step_process, name=step.name,
                              args=(step.name, args.device, args.tiny, str(folder), str(result), str(log)))
    process.start()
    process.join(step.budget_s)
    stopped = process.exitcode is None
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # over budget, or loader workers a finished step left behind
    process.join()
    rows = [Row(**row) for row in json.loads(result.read_text())] if result.exists() else []
    if process.exitcode == 0 and rows:
        return rows
    with log.open(errors="replace") as text:
        text.seek(start)
        tail = text.read().strip().splitlines()[-30:]
    print("\n".join(f"    | {line}" for line in tail), flush=True)
    if stopped:
        why = f"stopped at its {step.budget_s} s budget"
    else:
        last = next((line.strip() for line in reversed(tail) if line.strip()), "no output")
        why = f"exit code {process.exitcode}: {last[:200]}"
    return [*rows, Row(step.label, "the step", "did not finish", failed(why))]


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def write_table(path: Path, rows: list[Row], header: list[str]) -> str:
    lines = [*header, "", "| step | measured | figure | verdict |", "| --- | --- | --- | --- |"]
    lines += [f"| {cell(r.step)} | {cell(r.measured)} | {cell(r.figure)} | {cell(r.verdict)} |" for r in rows]
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu_check.md"),
                        help="the Markdown table (default ./gpu_check.md); the steps' output goes beside it, .log")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="cpu: hide the GPU from every step (the dry run)")
    parser.add_argument("--tiny", action="store_true", help="tiny models, images and step counts (the dry run)")
    parser.add_argument("--only", default="", help=f"comma-separated steps, of: {', '.join(s.name for s in STEPS)}")
    args = parser.parse_args(argv)
    args.only = [name for name in args.only.split(",") if name]
    unknown = sorted(set(args.only) - {s.name for s in STEPS})
    if unknown:
        parser.error(f"--only: unknown step {', '.join(unknown)}; the steps are {', '.join(s.name for s in STEPS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    chosen = [s for s in STEPS if not args.only or s.name in args.only]
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log")
    log.write_text("")
    command = " ".join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    header = [f"# GPU check, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "",
              f"`{command}`; each step's output: `{log.name}`"]
    rows = [environment_row()]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work_name:
        os.environ.update(steps_environment(args.device, Path(work_name)))
        sys.path[:0] = [str(ROOT), str(BENCHMARKS)]
        context, how = step_processes(args.device)
        rows[0].figure += f"; {how}"
        for number, step in enumerate(chosen, 1):
            print(f"[{number}/{len(chosen)}] {step.label} (budget {step.budget_s} s)", flush=True)
            step_started = time.monotonic()
            step_rows = run_step(step, args, context, Path(work_name), log)
            rows += step_rows
            verdicts = {row.verdict.split(":")[0] for row in step_rows}
            print(f"    {time.monotonic() - step_started:.0f} s: {', '.join(sorted(verdicts))}", flush=True)
            write_table(out, rows, header)
    header.append(f"\nAll steps: {time.monotonic() - started:.0f} s.")
    print("\n" + write_table(out, rows, header), flush=True)
    print(f"written: {out} and {log}")
    return 1 if any(row.verdict.startswith("failed") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
