"""data.batch_size = "auto": the search under injected out-of-memory errors (CPU), the global batch
kept through accumulation, and (with CUDA only) the real probe and a real run."""

import io
from contextlib import redirect_stdout
from types import SimpleNamespace

import pytest
import torch

from configs.errors import ConfigError, TrainingFailed
from trainer.assemble.batch_size import CPU_DEFAULT, SAFETY, resolve_batch_size, search_batch_size, with_global_batch
from trainer.assemble.run_config import load_config


def oom_above(limit: int, calls: list | None = None):
    """A fake training step that runs out of CUDA memory for batches over `limit` (what a GPU does)."""
    def try_step(n: int) -> None:
        if calls is not None:
            calls.append(n)
        if n > limit:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {n} images")
    return try_step


@pytest.mark.parametrize("limit", [1, 2, 7, 100, 300, 1000, 3000])
def test_search_finds_the_largest_fit_and_keeps_a_margin(limit):
    calls = []
    search = search_batch_size(oom_above(limit, calls), cap=4096)
    # Doubling up to the first out-of-memory, then bisecting: never a size tried twice.
    doubling = [2 ** i for i in range(len(calls)) if 2 ** i <= limit]
    assert calls[:len(doubling) + 1] == doubling + [2 * doubling[-1]]
    assert len(calls) == len(set(calls))
    assert search.largest_fit <= limit < search.first_oom
    assert search.first_oom - search.largest_fit <= max(1, search.largest_fit // 16)
    kept = int(search.largest_fit * SAFETY) or 1
    assert search.batch_size == (kept - kept % 8 if kept >= 16 else kept)
    assert search.batch_size <= limit and search.batch_size >= 0.8 * limit - 8


def test_search_stops_at_the_cap_without_a_margin():
    calls = []
    search = search_batch_size(oom_above(10_000, calls), cap=100)
    assert calls == [1, 2, 4, 8, 16, 32, 64, 100]
    assert search.first_oom is None and search.batch_size == 100


def test_out_of_memory_at_one_image_is_one_line_and_other_errors_pass_through():
    with pytest.raises(TrainingFailed, match="not even one image fits in GPU memory"):
        search_batch_size(oom_above(0))

    def broken(n):
        raise ValueError("shapes do not match")
    with pytest.raises(ValueError, match="shapes"):
        search_batch_size(broken)


def test_cudnn_style_allocation_failures_count_as_out_of_memory():
    def step(n):
        if n > 20:
            raise RuntimeError("CUDA error: out of memory (cuDNN workspace)")
    assert search_batch_size(step).largest_fit <= 20


@pytest.mark.parametrize("per_process, processes, target, expected", [
    (48, 2, 256, (32, 4)),  # 128 per process: 2 steps of 64 do not fit, 4 of 32 do
    (512, 1, 256, (256, 1)),  # fits in one step
    (100, 4, 96, (24, 1)),
    (7, 1, 30, (6, 5)),  # the fewest accumulation steps that divide the batch exactly
    (1, 1, 5, (1, 5)),
])
def test_the_global_batch_is_kept_through_accumulation(per_process, processes, target, expected):
    batch, accum = with_global_batch(per_process, processes, target)
    assert (batch, accum) == expected and batch * processes * accum == target and batch <= per_process


def test_a_global_batch_the_processes_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="not a multiple of the 3 processes"):
        with_global_batch(64, 3, 100)


def fake_accelerator(device: str, processes: int = 1):
    return SimpleNamespace(device=torch.device(device), num_processes=processes, print=print,
                           gradient_accumulation_steps=1)


def resolve(cfg, accelerator, try_step, samples=1000):
    out = io.StringIO()
    with redirect_stdout(out):
        resolve_batch_size(cfg, accelerator, try_step, samples)
    return out.getvalue()


def auto_config(*extra):
    return load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", "data.batch_size=auto", *extra])


def test_on_cuda_the_found_number_replaces_auto_and_the_global_batch_sets_accumulation(tmp_path):
    cfg = auto_config("train.global_batch_size=512")
    accelerator = fake_accelerator("cuda")  # the search only calls try_step: no GPU needed
    printed = resolve(cfg, accelerator, oom_above(150))
    # At most 150 fit: doubling reaches 128, bisection 144 (out of memory at 152), 87.5% is 126, a
    # multiple of 8: 120. 512 = 64 x 8 (128 and 256 per step do not fit in 120).
    assert printed.startswith("batch size auto: found 120 per process (largest that fit 144, out of memory at "
                              "152, kept 87.5%; tried 1, 2, 4, 8, 16, 32, 64, 128, 256, 192, 160, 144, 152)")
    assert "; train.global_batch_size 512 = 64 x 1 process(es) x 8 accumulation" in printed
    assert cfg.data.batch_size == 64 and cfg.train.grad_accum_steps == 8
    assert accelerator.gradient_accumulation_steps == 8
    assert "batch_size = 64\n" in cfg.to_toml() and 'batch_size = "auto"' not in cfg.to_toml()
    # config.toml re-runs as a fixed batch with its accumulation: the same global batch, no search.
    toml = tmp_path / "config.toml"
    toml.write_text(cfg.to_toml())
    again = load_config(toml)
    assert (again.data.batch_size, again.train.grad_accum_steps, again.train.global_batch_size) == (64, 8, 0)


def test_on_cpu_the_default_is_used_and_said_in_one_line():
    def never(n):
        raise AssertionError("no search on CPU")
    cfg = auto_config()
    printed = resolve(cfg, fake_accelerator("cpu"), never)
    assert cfg.data.batch_size == CPU_DEFAULT and cfg.train.grad_accum_steps == 1
    assert printed == f"batch size auto: found {CPU_DEFAULT} per process (no CUDA device, the default {CPU_DEFAULT})\n"
    cfg = auto_config()
    printed = resolve(cfg, fake_accelerator("cpu", processes=2), never, samples=20)
    assert cfg.data.batch_size == 10 and "capped at the 10 training images per process" in printed


@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=many"], 'data.batch_size must be an integer or "auto", got \'many\''),
    (["data.batch_size=0"], 'data.batch_size must be at least 1, or "auto"'),
    (["train.global_batch_size=256"], "train.global_batch_size is kept with data.batch_size=auto"),
    (["data.batch_size=auto", "train.global_batch_size=256", "train.grad_accum_steps=2"],
     "set train.global_batch_size or train.grad_accum_steps, not both"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.root=/tmp/x", "model.name=tiny_cnn", *overrides])
    assert message in str(err.value)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_the_real_probe_runs_out_of_memory_and_backs_off(fresh_accelerate_state):
    """resnet18 at 224 px under a memory cap: the probe meets a real OutOfMemoryError, the batch it
    keeps trains, and the model it probed keeps its weights."""
    from accelerate import Accelerator
    from models import build_classifier
    from trainer.assemble.batch_size import step_probe

    accelerator = Accelerator()
    built = build_classifier("timm/resnet18", 10)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, 4 * 2**30 / total))  # about 4 GiB
    try:
        probe = step_probe(built.model, lambda m: torch.optim.AdamW(m.parameters()), torch.nn.CrossEntropyLoss(),
                           accelerator, (torch.randn(3, 224, 224), torch.tensor(3)))
        search = search_batch_size(probe, cap=4096)
        assert search.first_oom is not None and 8 <= search.batch_size < search.largest_fit < search.first_oom
        probe(search.batch_size)  # what training will use fits
        print(f"resnet18 224px under 4 GiB: {search.describe()}; kept {search.batch_size}")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert all(torch.equal(before[k], v) for k, v in built.model.state_dict().items())


@cuda
def test_a_cuda_run_records_the_number_found(tmp_path, fresh_accelerate_state):
    from helpers import make_image_folder
    from trainer.fit.loop import train

    images = make_image_folder(tmp_path / "images", per_class=10)
    cfg = load_config(None, [f"data.root={images}", f"run.dir={tmp_path / 'run'}", "model.name=tiny_cnn",
                             "data.image_size=16", "data.num_workers=0", "train.epochs=1", "data.batch_size=auto",
                             "wandb.mode=disabled", "runtime.device=cuda", "data.audit=off"])
    train(cfg)
    recorded = (tmp_path / "run" / "config.toml").read_text()
    assert "batch_size = 24" in recorded  # tiny_cnn fits everything: the cap, 24 training images
