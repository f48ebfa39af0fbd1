"""Where audit results live, and the per-file measurement cache keyed by path, size and mtime.

Everything for one data root sits in one folder (by default under ~/.cache/imgtrain/audit, or
`data.audit_dir`, or $IMGTRAIN_AUDIT_DIR): `measurements.json` (the cache), `report.json` / `report.csv` (the last
audit's problems) and `stats.json` (the training split's mean and std). Nothing is written into
the data root itself, which may be read-only or shared.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from data.files import atomic_write_json

CACHE_VERSION = 1


def default_cache_root() -> Path:
    if os.environ.get("IMGTRAIN_AUDIT_DIR"):  # tests and shared machines point this elsewhere
        return Path(os.environ["IMGTRAIN_AUDIT_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "imgtrain" / "audit"


def audit_dir_for(root: Path, audit_dir: str = "") -> Path:
    """The folder holding one data root's cache and reports: named after the root, plus a short
    hash of its absolute path so two roots called `images` do not share a cache."""
    root = Path(root).resolve()
    base = Path(audit_dir).expanduser() if audit_dir else default_cache_root()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return base / f"{root.name or 'root'}-{digest}"


class MeasurementCache:
    """{relative path: measurement} for one root. An entry is reused only while the file's size
    and modification time (in nanoseconds) are unchanged; anything else is measured again."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.path = folder / "measurements.json"
        self.enabled = enabled
        self.entries: dict[str, dict] = {}
        if enabled and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
                if data.get("version") == CACHE_VERSION:
                    self.entries = data["files"]
            except (ValueError, KeyError, OSError):
                self.entries = {}  # a damaged cache costs one slow audit, never a wrong answer

    def get(self, relpath: str, size: int, mtime_ns: int) -> dict | None:
        entry = self.entries.get(relpath)
        if entry and entry["size"] == size and entry["mtime_ns"] == mtime_ns:
            return entry
        return None

    def save(self, measurements: dict[str, dict]) -> None:
        """Replace the cache with this run's measurements: files that are gone drop out."""
        if not self.enabled:
            return
        self.entries = measurements
        atomic_write_json(self.path, {"version": CACHE_VERSION, "files": measurements})
