"""docs/configuration.md, the key reference, rendered from the schema so that it cannot drift.

    python -m configs.reference > docs/configuration.md     # regenerate after changing configs/schema.py

Every key, its type, default, allowed values and meaning come from the dataclasses in
`configs/schema.py` (through `key_infos`); this module adds only the page's prose and the link from
each section to the manual page that explains it. tests/unit/test_docs.py fails when the file in
docs/ differs from what this prints.
"""

from __future__ import annotations

import sys

from configs.schema import LONG_STRING_KEYS, MAX_STRING_CHARS, KeyInfo, key_infos

REGENERATE = "python -m configs.reference > docs/configuration.md"

# Which manual page explains each section (links are relative to docs/).
SECTIONS = {
    "data": ("Where samples come from, how they are split, audited, decoded and augmented.",
             "[Data sources](data-sources.md)"),
    "model": ("The backbone, its head, its weights and what of it trains.",
              "[Fine-tuning](fine-tuning.md)"),
    "optim": ("The optimizer and the learning-rate schedule.", "[Fine-tuning](fine-tuning.md)"),
    "train": ("The loop: epochs, precision, the best model, logging, checkpoints, EMA.",
              "[Fine-tuning](fine-tuning.md), [Speed](speed.md), [Resume and faults](resume-and-faults.md)"),
    "runtime": ("Devices, processes and the speed switches.", "[Distributed runs](distributed.md), [Speed](speed.md)"),
    "run": ("The run folder and resuming.", "[Resume and faults](resume-and-faults.md)"),
    "wandb": ("Weights & Biases.", "[Watching training](watching-training.md)"),
}

INTRO = f"""\
# Configuration keys

<!-- Generated from configs/schema.py by `{REGENERATE}`. Do not edit by hand. -->

A run is one TOML file with the sections below, plus `section.key=value` overrides on the command
line; `configs/` holds complete examples (one per [recipe](fine-tuning.md#recipes)).

```bash
python launch/train.py --keys                          # this table as plain text
python launch/train.py --config C.toml --print-config  # the resolved config, then exit
accelerate launch --multi_gpu --num_machines 1 --num_processes 2 --mixed_precision no --dynamo_backend no \\
    launch/train.py --config C.toml train.epochs=3 model.name=timm/resnet18 \\
    'data.augment_ops=["random_erasing(p=0.25)"]'
```

- Every key is checked once, up front, before anything is written. An unknown key is refused
  with the closest valid key suggested. A value that is not one of a key's allowed values is
  refused with the value meant where another tool's name says it (`fp32` -> `no`, `bf16-mixed` ->
  `bf16`, `OneCycleLR` -> `cosine`), else with the list.
- An override is typed by its key: a string is taken as written, anything else is read as a TOML
  value (`true`, `3e-4`, `[0.5, 0.5, 0.5]`); a key typed `... or "auto"` also takes `auto`.
  A string value is at most {MAX_STRING_CHARS:,} characters (the longest path Linux opens;
  {', '.join(f"`{k}`: {n:,}" for k, n in LONG_STRING_KEYS.items())}).
  Overrides may come before or after options (`--config C data.root=X --print-config
  train.epochs=1`).
- The resolved config is written to `RUN_DIR/config.toml` and into every checkpoint's metadata.
  `data.batch_size` and `train.precision` are recorded as what ran, never `auto`, so a re-run
  from a run's `config.toml` trains the same way without searching again.
"""


def render() -> str:
    """The whole of docs/configuration.md."""
    by_section: dict[str, list[KeyInfo]] = {}
    for info in key_infos():
        by_section.setdefault(info.key.split(".", 1)[0], []).append(info)
    parts = [INTRO]
    for section, infos in by_section.items():
        purpose, pages = SECTIONS.get(section, ("", ""))
        parts.append(f"## [{section}]\n")
        if purpose:
            parts.append(f"{purpose} See {pages}.\n")
        parts.append(_table(infos))
    return "\n".join(parts)


def _table(infos: list[KeyInfo]) -> str:
    rows = ["| key | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
    for info in infos:
        allowed = ", ".join(f"`{c}`" for c in info.choices)
        rows.append(f"| `{info.key}` | {_cell(info.type_name)} | `{info.default}` | {allowed} | {_cell(info.doc)} |")
    return "\n".join(rows) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
