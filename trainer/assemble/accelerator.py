"""The Accelerator for this run: device, processes, precision and threads, decided by how it was launched.

`python launch/train.py` runs one process; `accelerate launch` (flags or an `accelerate config`
file) or `torchrun` decide the number of processes and machines. The `[runtime]` section may force
the device (`auto | cpu | cuda`) and ask for `nn.DataParallel` (`parallel = "dp"`).
`train.precision` overrides `--mixed_precision` when it is not "auto".

Every decision that differs from what was asked is printed as a `note:` line by the main
process; nothing is downgraded silently. The small `resolve_*` functions hold the decisions
so they can be tested without hardware.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, TorchDynamoPlugin
from torch import nn

from configs.schema import Config
from configs.errors import ConfigError
from trainer.assemble.process_group import group_kwargs, record_peers


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 in hardware (AVX512-BF16, AMX); elsewhere it is emulated and slow."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_cpu(device: str, cuda_available: bool) -> bool:
    """Whether to run on CPU. Without CUDA the answer is always yes, and Accelerate must hear it:
    without cpu=True, `accelerate launch --multi_gpu --num_processes 2` on a GPU-less machine starts
    two independent single-process runs instead of one DDP group over gloo."""
    if device == "cuda" and not cuda_available:
        raise ConfigError("runtime.device = 'cuda' but no CUDA GPU is visible (torch.cuda.is_available() is "
                          "False); use runtime.device=auto or runtime.device=cpu")
    return device == "cpu" or not cuda_available


def resolve_precision(requested: str, on_cpu: bool, native_bf16: bool) -> tuple[str, str | None]:
    """(precision to run, note for the user or None). `requested` is no | bf16 | fp16."""
    if not on_cpu:
        return requested, None
    if requested == "fp16":
        # Accelerate would silently run fp32 here: fp16 autocast with gradient scaling is GPU-only.
        if native_bf16:
            return "bf16", "fp16 needs a GPU (gradient scaling is CUDA-only); running bf16 on this CPU instead"
        return "no", ("fp16 needs a GPU (gradient scaling is CUDA-only) and this CPU has no native bf16 "
                      "(AVX512-BF16/AMX), where emulated bf16 is many times slower; running fp32 instead")
    if requested == "bf16" and not native_bf16:
        return "bf16", ("this CPU has no native bf16 (AVX512-BF16/AMX): bf16 is emulated and usually much "
                        "slower than fp32 here; train.precision=no is the fast choice")
    return requested, None


def precision_asked(configured: str, launcher: str | None) -> tuple[str, str | None]:
    """(no | bf16 | fp16, note when the config and `accelerate launch --mixed_precision` disagree).
    train.precision = "auto" follows the launcher; any other value wins over it, said in one line."""
    launcher = (launcher or "").lower() or None
    if configured == "auto":
        requested = launcher or "no"
        if requested not in ("no", "bf16", "fp16"):
            raise ConfigError(f"mixed precision {requested!r} from accelerate launch is not supported; "
                              "use --mixed_precision no|bf16|fp16 or train.precision")
        return requested, None
    if launcher and launcher != configured and launcher != "no":
        return configured, (f"train.precision = '{configured}' (config) wins over accelerate launch "
                            f"--mixed_precision {launcher}; set train.precision=auto to follow the launcher")
    return configured, None


def resolve_parallel(parallel: str, on_cpu: bool, gpu_count: int, num_processes: int) -> tuple[bool, str | None]:
    """(wrap in nn.DataParallel, note for the user or None)."""
    if parallel == "dp":
        if num_processes > 1:
            raise ConfigError(f"runtime.parallel = 'dp' is one process driving several GPUs, but {num_processes} "
                              "processes were launched; use runtime.parallel=ddp with accelerate launch, or run "
                              "`python launch/train.py` for DataParallel")
        if on_cpu or gpu_count < 2:
            seen = "no GPU" if on_cpu else f"{gpu_count} GPU"
            return False, f"runtime.parallel = 'dp' needs at least two visible GPUs; {seen} here, running on one device"
        return True, None
    if parallel == "ddp" and num_processes == 1:
        return False, ("runtime.parallel = 'ddp' but only one process was launched: start several with "
                       "`accelerate launch --multi_gpu --num_processes N` (on CPU too)")
    if parallel == "auto" and not on_cpu and gpu_count > 1 and num_processes == 1:
        return False, (f"{gpu_count} GPUs are visible but one process uses one of them: launch with "
                       f"`accelerate launch --multi_gpu --num_processes {gpu_count}` or set runtime.parallel=dp")
    return False, None


def cpu_thread_count(configured: int, cores: int, local_processes: int) -> int:
    """Threads per process: the processes on one machine share its cores instead of oversubscribing."""
    if configured > 0:
        return configured
    return max(1, cores // max(1, local_processes))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# What one DataLoader worker may come to hold: the pages of the trainer it touches after the fork
# (copy-on-write) and the decoded batches it keeps ready. Workers of the train and val loaders.
WORKER_MEMORY = 512 * 2**20


def worker_count(configured: int | str) -> tuple[int, str | None]:
    """(data.num_workers to use, note for the user or None). "auto" gives each process on this machine
    its share of the cores, less one for the process itself (16 cores, 1 GPU: 15 workers; 2 cores: 1),
    and no more than the free memory holds. A number is kept up to what the machine allows (worker_limit), and capped there with a note:
    1000 workers would fork until the kernel's OOM killer ends the trainer and leaves workers behind.
    PyTorch's DataLoader warns from the same bound (its cores) but starts them all."""
    cores, local = available_cores(), local_process_count()
    memory = available_memory()
    limit = worker_limit(cores, memory, local)
    if configured == "auto":  # within what the memory holds too, without a note: nothing asked was refused
        return min(max(1, cores // local - 1), max(1, limit)), None
    if configured <= limit:
        return configured, None
    free = f", {memory / 2**30:.1f} GiB of memory free" if memory is not None else ""
    return limit, (f"data.num_workers={configured} is more than this machine allows ({cores} cores{free}, "
                   f"{local} training process(es)); using {limit} worker processes per training process")


def worker_limit(cores: int, memory: int | None, local_processes: int) -> int:
    """The most DataLoader workers one training process may start: one per core of the machine
    (more only queue for the same cores), and what the free memory holds at WORKER_MEMORY each."""
    limit = cores
    if memory is not None:
        limit = min(limit, memory // (WORKER_MEMORY * max(1, local_processes)))
    return max(0, limit)


def available_memory() -> int | None:
    """Bytes this process may still allocate: the machine's MemAvailable, or less under a cgroup
    (container) memory limit; None where neither can be read."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            room = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = room if free is None else min(free, room)
    except (OSError, ValueError):
        pass
    return free


def channels_last_on(cfg: Config, accelerator: Accelerator) -> bool:
    """runtime.channels_last: "auto" is on with CUDA (tensor-core convolutions want NHWC), off on CPU."""
    value = cfg.runtime.channels_last
    return accelerator.device.type == "cuda" if value == "auto" else bool(value)


def decode_on(cfg: Config, accelerator: Accelerator) -> str:
    """data.decode: where training JPEGs are decoded. "auto" picks the GPU when this process has
    fewer than 4 CPU cores to itself: too few to decode as fast as a GPU trains."""
    value, cuda = cfg.data.decode, accelerator.device.type == "cuda"
    if value == "cuda" and not cuda:
        raise ConfigError(f'data.decode = "cuda" needs a CUDA device, and this run is on {accelerator.device.type}; '
                          'use data.decode=auto or data.decode=cpu')
    if value == "auto":
        return "cuda" if cuda and available_cores() // local_process_count() < 4 else "cpu"
    return value


def local_process_count() -> int:
    # torchrun (which `accelerate launch --multi_gpu` runs) says how many processes share this machine.
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def make_accelerator(cfg: Config, trackers: list | None = None) -> Accelerator:
    """The run's Accelerator. Accelerate takes its trackers at construction, so the caller that logs
    (the fit loop) hands them in; the W&B run itself starts (main process only) in
    RunTracking.start, once the run folder exists. Assembling a run never imports W&B."""
    rt = cfg.runtime
    on_cpu = resolve_cpu(rt.device, torch.cuda.is_available())
    requested, winner_note = precision_asked(cfg.train.precision, os.environ.get("ACCELERATE_MIXED_PRECISION"))
    precision, precision_note = resolve_precision(requested, on_cpu, on_cpu and cpu_has_native_bf16())
    # What runs is what the run records (config.toml, checkpoints): re-running from its config
    # trains the same way, whatever the launcher says then.
    cfg.train.precision = precision

    # None lets `accelerate launch --dynamo_backend` decide; the config option asks for inductor.
    dynamo = TorchDynamoPlugin(backend="inductor") if rt.compile else None
    from models.finetune import needs_unused_parameter_search

    handlers = [group_kwargs(rt.ddp_timeout)]  # how long a process waits for the others at a collective
    if needs_unused_parameter_search(cfg):  # frozen-then-unfrozen parameters are outside the graph at first
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    accelerator = Accelerator(cpu=on_cpu, mixed_precision=precision, log_with=trackers or None, dynamo_plugin=dynamo,
                              gradient_accumulation_steps=cfg.train.grad_accum_steps, kwargs_handlers=handlers)
    record_peers(accelerator)  # a collective failing later names the rank it waited for

    torch.set_num_threads(cpu_thread_count(rt.cpu_threads, available_cores(), local_process_count()))
    if not on_cpu:
        # cuDNN times its algorithms once per input shape; a training run has one or two shapes.
        torch.backends.cudnn.benchmark = rt.cudnn_benchmark in ("auto", True)
    notes = [winner_note, precision_note]
    if rt.sync_bn and on_cpu and accelerator.num_processes > 1:
        notes.append("runtime.sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); BatchNorm statistics "
                     "stay per process")
    notes.append(resolve_parallel(rt.parallel, on_cpu, 0 if on_cpu else torch.cuda.device_count(),
                                  accelerator.num_processes)[1])
    if accelerator.is_main_process:
        for note in filter(None, notes):
            print(f"note: {note}", file=sys.stderr, flush=True)
    return accelerator


def sync_bn_on(cfg: Config, accelerator: Accelerator) -> bool:
    """runtime.sync_bn takes effect with CUDA and several processes (SyncBatchNorm has no CPU kernel)."""
    return cfg.runtime.sync_bn and accelerator.device.type != "cpu" and accelerator.num_processes > 1


def prepare_model(model: nn.Module, accelerator: Accelerator, cfg: Config) -> nn.Module:
    """What the runtime changes on the model before `accelerator.prepare` (which adds DDP). Frozen
    BatchNorm (model.bn, model.freeze) stays frozen as SyncBatchNorm: the conversion keeps the same
    parameters, without gradient, and set_train_mode keeps those layers in eval, where they do not sync."""
    rt = cfg.runtime
    on_cpu = accelerator.device.type == "cpu"
    if sync_bn_on(cfg, accelerator):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if channels_last_on(cfg, accelerator):
        model = model.to(memory_format=torch.channels_last)
    use_dp, _ = resolve_parallel(rt.parallel, on_cpu, 0 if on_cpu else torch.cuda.device_count(),
                                 accelerator.num_processes)
    if use_dp:
        # DataParallel scatters each batch from the first GPU; Accelerate moves the wrapper there.
        model = nn.DataParallel(model.to(accelerator.device))
    return model


def parallel_mode(accelerator: Accelerator, model: nn.Module) -> str:
    if isinstance(model, nn.DataParallel):
        return f"dp over {len(model.device_ids)} GPUs"
    if accelerator.distributed_type == DistributedType.MULTI_CPU:
        return "ddp (gloo)"
    if accelerator.distributed_type == DistributedType.MULTI_GPU:
        return "ddp (nccl)"
    return "none"


def describe(accelerator: Accelerator, batch_size: int, grad_accum_steps: int = 1, model: nn.Module | None = None) -> dict:
    """Facts about the run's hardware recorded in the log and in checkpoint metadata."""
    return {
        "device": accelerator.device.type,  # rank 0's index (cuda:0) says nothing about the run
        "num_processes": accelerator.num_processes,
        "num_machines": max(1, accelerator.num_processes // local_process_count()),
        "parallel": parallel_mode(accelerator, model) if model is not None else "none",
        "precision": accelerator.mixed_precision,
        "cpu_threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "grad_accum_steps": grad_accum_steps,
        "global_batch_size": batch_size * accelerator.num_processes * grad_accum_steps,
    }

