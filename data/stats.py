"""`data.normalize = "dataset"`: the training split's per-channel mean and std, computed once.

The audit already decodes every file and stores each image's per-channel mean and mean of
squares in its cache, so the dataset's statistics cost nothing extra; they are written to
`stats.json` next to the audit results and recorded in every checkpoint (as mean/std).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data.audit import AuditResult, dataset_moments
from data.audit_cache import write_audit_file


def training_stats(result: AuditResult, train_paths: list[str], write: bool = True) -> tuple[list, list]:
    """Mean and std of the given training files; cached in stats.json by the list of files."""
    key = hashlib.sha256("\n".join(sorted(train_paths)).encode()).hexdigest()
    path = Path(result.folder) / "stats.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("files_sha256") == key:
                return saved["mean"], saved["std"]
        except (ValueError, KeyError):
            pass
    mean, std, n = dataset_moments(result, train_paths)
    if write:
        write_audit_file(path, {"mean": mean, "std": std, "images": n, "files_sha256": key,
                                "root": str(result.root)}, indent=1)
    return mean, std
