"""Training-state checkpoints: folders of safetensors and JSON from which a run resumes exactly.

    run_dir/checkpoints/
        step-00000120/           one checkpoint, named by the optimizer steps done
            model.safetensors    the unwrapped model's state dict
            optimizer.safetensors the optimizer's tensors, keyed state.<param index>.<name>
            ema.safetensors      the EMA of the weights (train.ema_decay > 0; its update count in state.json)
            state.json           the rest: optimizer param groups (hyperparameters) and non-tensor
                                 state, scheduler counters, grad scaler, epoch, step, position in
                                 the epoch, best metric, early-stopping counter, history, W&B run
                                 id, class names and the resolved config
            rank-<r>.safetensors torch CPU and CUDA RNG states of process r
            rank-<r>.json        python and numpy RNG states and epoch running totals of process r
            COMPLETE             written last: the size and sha256 of every file above
        latest                   name of the newest complete checkpoint, moved after it is complete
        best                     name of the checkpoint that ended the best epoch, never rotated away

A checkpoint is written into a hidden temporary folder, every file fsynced, then renamed into
place, so a kill at any moment leaves either no new folder or a complete one, and the previous
checkpoints untouched. Nothing is pickled: tensors go to safetensors, everything else to JSON
(Python's json writes floats with repr, which reads back bit for bit).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from configs.errors import TrainingFailed
from data.files import atomic_output, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from trainer.files.model_file import plain_tensors
from trainer.files.faults import crash_point

FORMAT = "imgtrain/state-v1"
COMPLETE = "COMPLETE"
_NAME = re.compile(r"^step-(\d{8,})$")


class CheckpointWriteFailed(TrainingFailed):
    """A checkpoint could not be written (disk full, quota, I/O error); raised on every process."""


class DamagedCheckpoint(Exception):
    """A checkpoint folder that is incomplete, truncated or corrupt; the message names the file."""


def folder_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(folder: Path) -> int | None:
    match = _NAME.match(folder.name)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------
# Files


def write_json(path: Path, data: Any) -> None:
    atomic_write_json(path, data, sort_keys=True, durable=True)


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    with atomic_output(path, durable=True) as tmp:
        save_file(plain_tensors(tensors), str(tmp), metadata={"format": FORMAT})


def write_pointer(path: Path, target: str) -> None:
    """Replace a one-line pointer file atomically and durably."""
    atomic_write_text(path, target + "\n", durable=True)


def read_pointer(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------
# Optimizer, scheduler, scaler and RNG states as tensors + JSON


def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into safetensors tensors and a JSON-able rest."""
    tensors, scalars = {}, {}
    for index, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:  # plain numbers, or None (SGD without momentum keeps momentum_buffer = None)
                scalars.setdefault(str(index), {})[key] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def scheduler_state(scheduler) -> dict:
    # A LambdaLR's lambdas are code, rebuilt from the config; its state is only counters and lrs.
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def load_scheduler_state(scheduler, state: dict) -> None:
    scheduler.load_state_dict({**state, "lr_lambdas": [None] * len(scheduler.lr_lambdas)})


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's python, numpy, torch CPU and CUDA generator states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda.")),
                                        key=lambda k: int(k.split(".")[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


# ----------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(accelerator, root: Path, step: int, *, model_state: dict[str, torch.Tensor],
                    optimizer_state: dict, trainer_state: dict, rank_tensors: dict[str, torch.Tensor],
                    rank_json: dict, ema_state: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint `step` under `root`; every process calls this (it has two barriers).

    `model_state`, `optimizer_state`, `trainer_state` and `ema_state` are only read on the main process;
    each process passes its own `rank_*` payload (RNG states, running totals).
    """
    final = root / folder_name(step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while writing
        tmp.mkdir()
    accelerator.wait_for_everyone()
    rank = accelerator.process_index

    def write_files() -> None:
        write_tensors(tmp / f"rank-{rank}.safetensors", rank_tensors)
        write_json(tmp / f"rank-{rank}.json", rank_json)
        if accelerator.is_main_process:
            crash_point("checkpoint_files", step)
            write_tensors(tmp / "model.safetensors", model_state)
            opt_tensors, opt_meta = flatten_optimizer(optimizer_state)
            write_tensors(tmp / "optimizer.safetensors", opt_tensors)
            if ema_state is not None:
                write_tensors(tmp / "ema.safetensors", ema_state)
            write_json(tmp / "state.json", {**trainer_state, "format": FORMAT, "step": step,
                                            "optimizer": opt_meta, "num_processes": accelerator.num_processes})

    _written_everywhere(accelerator, write_files, tmp, final)
    crash_point("checkpoint_write", step)
    _written_everywhere(accelerator, lambda: _complete(accelerator, tmp, final, step), tmp, final)
    return final


def _written_everywhere(accelerator, write, tmp: Path, final: Path) -> None:
    """Run this process's share of a checkpoint write; then every process agrees whether all
    shares were written (a collective), and all stop together with one line if one was not (disk
    full, quota, I/O error), the half-written folder removed and every earlier checkpoint intact."""
    problem = ""
    try:
        write()
    except (OSError, SafetensorError) as e:
        problem = f"{type(e).__name__}: {e}"
    if accelerator.num_processes > 1:
        problem = "; ".join(p for p in gather_object([problem]) if p)
    if problem:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteFailed(f"could not write checkpoint {final} ({problem}); it was removed and the "
                                    "checkpoints before it are intact. Free space in run.dir and continue with "
                                    "run.resume=auto")
    accelerator.wait_for_everyone()


def _complete(accelerator, tmp: Path, final: Path, step: int) -> None:
    """Mark the written folder COMPLETE and move it into place (the main process)."""
    if accelerator.is_main_process:
        root = final.parent
        files = sorted(p for p in tmp.iterdir() if p.is_file())
        write_json(tmp / COMPLETE, {"format": FORMAT, "step": step,
                                    "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in files}})
        fsync_dir(tmp)
        if final.exists():
            # Only a damaged folder or one from a run resumed further back can be in the way;
            # it goes only once the new one is complete.
            old = root / f".old-{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
        write_pointer(root / "latest", final.name)


def mark_best(root: Path, folder: Path) -> None:
    write_pointer(root / "best", folder.name)


def rotate(root: Path, keep_last: int) -> list[Path]:
    """Delete all but the `keep_last` newest complete checkpoints and the best; returns the deleted.

    Incomplete folders older than the newest complete one go too: nothing can resume from them.
    """
    folders = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    complete = [p for p in folders if (p / COMPLETE).is_file()]
    keep = set(complete[-keep_last:]) if keep_last > 0 else set()
    best = read_pointer(root / "best")
    if best:
        keep.add(root / best)
    newest = step_of(complete[-1]) if complete else -1
    doomed = [p for p in folders if p not in keep and step_of(p) <= newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------------------------
# Reading


def verify(folder: Path) -> dict:
    """The checkpoint's state.json after checking every file against COMPLETE; else DamagedCheckpoint."""
    marker = folder / COMPLETE
    if not folder.is_dir():
        raise DamagedCheckpoint(f"{folder} is not a folder")
    if not marker.is_file():
        if step_of(folder) is None and not (folder / "state.json").is_file():
            raise DamagedCheckpoint(f"{folder} is not a checkpoint (no {COMPLETE} or state.json in it) and not a run "
                                    f"folder (no checkpoints/ in it): name a run folder, a step-N folder in its "
                                    f"checkpoints/, or auto")
        raise DamagedCheckpoint(f"{folder} is incomplete: {COMPLETE} is missing (the run stopped while writing it)")
    files = _read_manifest(marker)
    for name, facts in files.items():
        path = folder / name
        if not path.is_file():
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if size != facts["bytes"]:
            raise DamagedCheckpoint(f"{path} is truncated or damaged: {size} bytes, {facts['bytes']} expected")
        if sha256_file(path) != facts["sha256"]:
            raise DamagedCheckpoint(f"{path} is damaged: its sha256 does not match {COMPLETE}")
    state = _read_state(folder / "state.json")
    missing = [f"rank-{r}.json" for r in range(state["num_processes"]) if f"rank-{r}.json" not in files]
    # state.json's "ema" (its update count) says the weights' average is part of this checkpoint.
    ema_missing = bool(state.get("ema")) and "ema.safetensors" not in files
    if state.get("format") != FORMAT or missing or ema_missing or "model.safetensors" not in files:
        raise DamagedCheckpoint(f"{folder} is not a complete {FORMAT} checkpoint")
    return state


def _read_manifest(marker: Path) -> dict[str, dict]:
    """COMPLETE's {file name: {"bytes", "sha256"}}. Any other shape (valid JSON written by hand or by
    something else) makes the checkpoint damaged, like a torn marker: `auto` passes over it to an
    older one, and a name that is not a plain file name in the folder is never opened or hashed."""
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError, OSError) as e:
        raise DamagedCheckpoint(f"{marker} is damaged ({type(e).__name__}: {e})") from None
    if not isinstance(files, dict):
        raise DamagedCheckpoint(f"{marker} is damaged: 'files' is a {type(files).__name__}, not an object")
    for name, facts in files.items():
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise DamagedCheckpoint(f"{marker} is damaged: it lists {name[:80]!r}, not a file of the checkpoint")
        if not (isinstance(facts, dict) and isinstance(facts.get("bytes"), int)
                and isinstance(facts.get("sha256"), str)):
            raise DamagedCheckpoint(f"{marker} is damaged: the entry of {name} is not {{bytes, sha256}}")
    return files


# What resuming reads from state.json, and its type: a hand edit that drops or retypes one is
# named, instead of failing later with a KeyError deep in the restore.
_STATE_KEYS = {"format": str, "num_processes": int, "epoch": int, "epoch_complete": bool, "samples_done": int,
               "global_step": int, "history": list, "epochs_without_improvement": int, "scheduler": dict,
               "class_names": list, "config": dict, "optimizer": dict}


def _read_state(path: Path) -> dict:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path} is not readable JSON ({e})") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(f"{path} does not hold a JSON object")
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            raise DamagedCheckpoint(f"{path} has no '{key}' (edited by hand?)")
        if not isinstance(state[key], kind) or (kind is int and isinstance(state[key], bool)):
            raise DamagedCheckpoint(f"{path}: '{key}' must be {kind.__name__}, not {type(state[key]).__name__} "
                                    "(edited by hand?)")
    return state


def complete_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders, newest first, not yet verified."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of, reverse=True)


def newest_valid(root: Path, warn, skipped: list[Path] | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies; each one skipped is reported through `warn` (and listed)."""
    for folder in complete_checkpoints(root):
        try:
            return folder, verify(folder)
        except DamagedCheckpoint as e:
            warn(f"skipping checkpoint {folder.name}: {e}")
            if skipped is not None:
                skipped.append(folder)
    return None


def set_aside(folder: Path) -> Path:
    """Rename a damaged checkpoint out of the way (kept for inspection, no longer a step-N folder)."""
    target = folder.with_name(folder.name + ".damaged")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(folder, target)
    return target


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise DamagedCheckpoint(f"{path} is not a readable safetensors file ({e})") from None


@dataclass
class LoadedState:
    folder: Path
    state: dict  # state.json
    model: dict[str, torch.Tensor]
    optimizer: dict  # an optimizer.state_dict()
    rank_tensors: dict[str, torch.Tensor] | None  # None when this process has no file (other process count)
    rank_json: dict | None
    ema: dict[str, torch.Tensor] | None = None  # the EMA's weights, when the run keeps one


def load_checkpoint(folder: Path, rank: int, state: dict | None = None) -> LoadedState:
    state = state or verify(folder)
    optimizer = unflatten_optimizer(_load(folder / "optimizer.safetensors"), state["optimizer"])
    rank_file = folder / f"rank-{rank}.json"
    rank_tensors = _load(folder / f"rank-{rank}.safetensors") if rank_file.is_file() else None
    rank_json = json.loads(rank_file.read_text()) if rank_file.is_file() else None
    ema = _load(folder / "ema.safetensors") if state.get("ema") else None
    return LoadedState(folder, state, _load(folder / "model.safetensors"), optimizer, rank_tensors, rank_json, ema)
