"""Export a trained checkpoint as ONNX and/or a Hugging Face Hub model folder, checked end to end.

    # both: model.onnx + model.safetensors + config.json (timm's form) + README.md model card
    python launch/export.py --checkpoint runs/demo/best.safetensors --format onnx --out exports/demo
    python launch/export.py --checkpoint RUN/best.safetensors --format both --out exports/my-model
    # check the ONNX graph on your own images (default: the run's validation split, if it is here)
    python launch/export.py --checkpoint RUN/best.safetensors --format onnx --out exports/x --images photos/
    # the run's images moved since training
    python launch/export.py --checkpoint RUN/best.safetensors --out exports/x --data-root /new/place/images
    # upload the Hub folder (needs `hf auth login`); the local folder is written either way
    python launch/export.py --checkpoint RUN/best.safetensors --format hub --out exports/x --push USER/REPO

ONNX: a dynamic batch axis, input `images` (normalized float32 NCHW), output `logits`, the class
names and preprocessing in the file's metadata; onnxruntime is run beside PyTorch right after export
(logits within 1e-4, same top-1) or nothing is written. Hub (timm backbones with a linear head):
loads with plain `timm.create_model("local-dir:OUT", pretrained=True)`, or `hf-hub:USER/REPO`
once pushed, with the label names and the run's eval preprocessing. The model card's per-class
table comes from evaluating the run's validation split at export. OUT must not exist yet (or be
empty): an export never writes into an existing folder, and a failed one leaves none behind. OUT
is a folder: a file's name (`--out model.onnx`) is refused before any work.
"""

from __future__ import annotations

from cli import output_folder, parse_script_args, run_main, script_parser


def main() -> int:
    parser = script_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="a .safetensors model file written by training")
    parser.add_argument("--format", default="both", choices=("onnx", "hub", "both"))
    parser.add_argument("--out", required=True, help="the export folder to create")
    parser.add_argument("--images", nargs="+", default=(), help="files or folders to check the ONNX graph on")
    parser.add_argument("--data-root", help="where the run's images are now, if not at its recorded data.root")
    parser.add_argument("--push", metavar="REPO_ID", help="upload the Hub folder to this Hub model repository")
    parser.add_argument("--private", action="store_true", help="with --push: create the repository private")
    parser.add_argument("--device", default="auto", help="for the evaluation behind the model card: auto, cpu, cuda")
    args = parse_script_args(parser)
    output_folder(args.out, "--out")
    from trainer.export.export_run import ExportRequest, export_checkpoint

    export_checkpoint(ExportRequest(args.checkpoint, args.out, args.format, tuple(args.images), args.data_root,
                                    args.push, args.private, args.device))
    return 0


if __name__ == "__main__":
    run_main(main)
