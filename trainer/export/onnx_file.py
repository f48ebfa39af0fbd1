"""A classifier as an ONNX file that gives the same answers as PyTorch, with what it expects inside.

The graph comes from torch's own exporter (`torch.onnx.export(dynamo=True)`: torch.export, then
onnxscript's ATen-to-ONNX table), with a dynamic batch axis: input `images`, float32
(batch, 3, H, W) already normalized; output `logits` (batch, classes). The file's metadata
(`metadata_props`, strings) holds the class names and the preprocessing, so a serving process
needs nothing but the file. Right after export, onnxruntime runs it beside the PyTorch model on
the same images: logits within `LOGIT_TOLERANCE` and the same top-1, or the export is refused.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from configs.errors import ProjectError, UsageError
from data.files import write_fault_in
from trainer.task.task import Task

INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 18  # onnxruntime >= 1.14 runs it; the dynamo exporter's own default
LOGIT_TOLERANCE = 1e-4  # fp32: reordered sums in fused kernels stay well inside this
_EMBED_LIMIT = 1 << 30  # protobuf caps a file at 2 GiB: larger weights go to model.onnx.data
_ATEN_OP = re.compile(r"aten[.:]+[A-Za-z_][\w]*(?:\.[A-Za-z_]\w*)?")


class ExportMismatch(ProjectError):
    """The exported graph computes something else than the model: a bug of the exporter or of
    onnxruntime, never of the user's input, so exit code 1."""


@dataclass(frozen=True)
class OnnxCheck:
    images: int  # how many images both ran on
    max_abs_diff: float  # of the logits
    top1_agree: int  # images with the same top-1 class
    batch_sizes: tuple[int, ...]  # the batch sizes onnxruntime ran (the batch axis is dynamic)

    def summary(self) -> str:
        return (f"onnxruntime matches PyTorch on {self.images} images: max |logit difference| "
                f"{self.max_abs_diff:.2e} (limit {LOGIT_TOLERANCE:.0e}), same top-1 on "
                f"{self.top1_agree}/{self.images}, batch sizes {', '.join(map(str, self.batch_sizes))}")


def export_onnx(model: nn.Module, image_size: int, path: Path, metadata: dict[str, str], model_name: str) -> None:
    """Write `model` (eval mode, CPU, fp32) to `path` with a dynamic batch axis and `metadata`."""
    import onnx

    example = torch.zeros(2, 3, image_size, image_size)  # 2: a batch of 1 would be specialized away
    large = sum(p.numel() * p.element_size() for p in model.state_dict().values()) > _EMBED_LIMIT
    log = io.StringIO()
    try:
        # The exporter narrates each step on stdout and warns about its own internals.
        with contextlib.redirect_stdout(log), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamo=True, opset_version=OPSET, external_data=large,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
    except Exception as e:  # torch.export and the converter raise many types
        fault = write_fault_in(e)  # a full disk is the machine's fault, not the model's
        if fault is not None:
            raise fault from None
        raise UsageError(not_exportable(model_name, e, log.getvalue())) from None
    proto = onnx.load(str(path), load_external_data=False)
    del proto.metadata_props[:]
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=value)
    proto.doc_string = f"{model_name} fine-tuned with imgtrain; input '{INPUT_NAME}' is normalized float32 NCHW"
    onnx.save(proto, str(path))


def not_exportable(model_name: str, error: BaseException, log: str = "") -> str:
    """One line naming the operator the ONNX converter has no translation for, where it says."""
    text = f"{error}\n{log}"
    ops = [op for op in _ATEN_OP.findall(text) if not op.endswith(".default")] or _ATEN_OP.findall(text)
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    if ops:
        why = f"no ONNX translation of the operator {ops[0]} (opset {OPSET})"
    else:
        why = f"{type(error).__name__}: {first[:200]}"
    return (f"{model_name} does not export to ONNX: {why}; the PyTorch checkpoint and --format hub "
            f"(timm backbones) still work")


def read_onnx_metadata(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@torch.no_grad()
def check_onnx(path: Path, model: nn.Module, images: torch.Tensor) -> OnnxCheck:
    """Run the file with onnxruntime beside `model` on `images` (normalized, N >= 1): in one batch
    of all and in batches of one, so the dynamic axis is exercised. Raises ExportMismatch."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    expected = model(images).float().numpy()
    batches = [images] if len(images) == 1 else [images, images[:1]]
    worst, agree = 0.0, 0
    for batch in batches:
        got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
        want = expected[: len(batch)]
        worst = max(worst, float(abs(got - want).max()))
        if len(batch) == len(images):
            agree = int((got.argmax(1) == want.argmax(1)).sum())
    check = OnnxCheck(len(images), worst, agree, tuple(len(b) for b in batches))
    if worst > LOGIT_TOLERANCE or agree != len(images):
        raise ExportMismatch(f"the exported {path.name} disagrees with the PyTorch model: {check.summary()}; "
                             f"nothing was written")
    return check


def metadata_of(model_name: str, class_names: list[str], preprocessing: dict, source: dict, task: Task,
                checkpoint_metadata: dict) -> dict[str, str]:
    """The ONNX file's metadata: strings, JSON where structured; the task's facts (its name, a
    multi-label model's thresholds) as the checkpoint records them."""
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in task.recorded(checkpoint_metadata).items()}
    return extra | {
        "format": "imgtrain/onnx-classifier-v1",
        "model_name": model_name,
        "class_names": json.dumps(class_names),
        "preprocessing": json.dumps(preprocessing, sort_keys=True),
        "input": f"{INPUT_NAME}: float32 (batch, 3, H, W), RGB scaled to [0, 1], minus mean, divided by std",
        "output": f"{OUTPUT_NAME}: float32 (batch, classes) in class_names order; {task.output_meaning}",
        "source": json.dumps(source, sort_keys=True),
    }
