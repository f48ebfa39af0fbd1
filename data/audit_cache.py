"""Where audit results live, and the per-file measurement cache keyed by path, size and mtime.

Everything for one data root sits in one folder (by default under ~/.cache/imgtrain/audit, or
`data.audit_dir`, or $IMGTRAIN_AUDIT_DIR): `measurements.json` (the cache), `verdict.json` (the
last audit's problems, keyed by everything they depend on), `report.json` / `report.csv` (the last
audit's problems) and `stats.json` (the training split's mean and std). Nothing is written into
the data root itself, which may be read-only or shared.

Everything here can be measured again, so a write the machine refuses (a full disk, a read-only
or unwritable folder) is one warning and the run goes on without the file (`write_audit_file`).
Under a read-only home the default location moves to the temporary folder, with a note.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

from data.files import atomic_write_json, is_write_fault, write_failed

CACHE_VERSION = 1


_said: set[str] = set()  # warnings and notes already given by this process


def _say_once(message: str) -> None:
    if message not in _said and os.environ.get("RANK", "0") == "0":  # every rank would say the same
        _said.add(message)
        print(message, file=sys.stderr, flush=True)


def default_cache_root() -> Path:
    if os.environ.get("IMGTRAIN_AUDIT_DIR"):  # tests and shared machines point this elsewhere
        return Path(os.environ["IMGTRAIN_AUDIT_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = Path(base) / "imgtrain" / "audit"
    if _writable(home):
        return home
    # A read-only home (containers, some clusters): this user's own folder in the temporary folder.
    fallback = Path(tempfile.gettempdir()) / f"imgtrain-audit-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        mine = not fallback.is_symlink() and fallback.stat().st_uid == os.getuid()
    except OSError:
        mine = False
    if not mine:  # someone else's: the writes to `home` will warn instead
        return home
    _say_once(f"note: {home} cannot be written (a read-only home?): audit caches and reports go to {fallback}; "
              f"set data.audit_dir (or IMGTRAIN_AUDIT_DIR) to keep them elsewhere")
    return fallback


def _writable(folder: Path) -> bool:
    """Whether `folder` could be created and written (its nearest existing parent's permission)."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def write_audit_file(path: Path, obj, *, indent: int | None = None) -> bool:
    """Write one of the audit folder's JSON files; False, with one warning per folder, when the
    machine refuses (what is cached is measured again next time, so that never ends a run)."""
    try:
        atomic_write_json(path, obj, indent=indent)
        return True
    except OSError as e:
        if not is_write_fault(e):
            raise
        warn_unwritable(path.parent, e)
        return False


def warn_unwritable(folder: Path, error: OSError) -> None:
    fault = write_failed(folder, error, "the audit goes on without its cache and report (every file is measured "
                                        "again next time): {remedy}, or set data.audit_dir (--audit-dir for "
                                        "launch/audit.py) to another folder")
    _say_once(f"warning: {fault}")


def audit_dir_for(root: Path, audit_dir: str = "") -> Path:
    """The folder holding one data root's cache and reports: named after the root, plus a short
    hash of its absolute path so two roots called `images` do not share a cache."""
    root = Path(root).resolve()
    base = Path(audit_dir).expanduser() if audit_dir else default_cache_root()
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return base / f"{root.name or 'root'}-{digest}"


class MeasurementCache:
    """{relative path: measurement} for one root. An entry is reused only while the file's size
    and modification time (in nanoseconds) are unchanged; anything else is measured again. Read
    on first use: a warm start that the verdict answers never parses it (100,000 entries: ~1 s)."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.path = folder / "measurements.json"
        self.enabled = enabled
        self._entries: dict[str, dict] | None = None

    @property
    def entries(self) -> dict[str, dict]:
        if self._entries is None:
            self._entries = _read_versioned(self.path, "files", {}) if self.enabled else {}
        return self._entries

    def get(self, relpath: str, size: int, mtime_ns: int) -> dict | None:
        entry = self.entries.get(relpath)
        if entry and entry["size"] == size and entry["mtime_ns"] == mtime_ns:
            return entry
        return None

    def save(self, measurements: dict[str, dict]) -> None:
        """Replace the cache with this run's measurements: files that are gone drop out."""
        if not self.enabled:
            return
        self._entries = measurements
        write_audit_file(self.path, {"version": CACHE_VERSION, "files": measurements})


class VerdictCache:
    """The problems the last audit found, stored with a key over every input they depend on: each
    audited file's relative path, split, class, size and mtime, and the audit's limits. A start
    whose key matches takes them as they are, without reading a measurement or comparing hashes;
    any difference (one file touched, a limit changed) audits through the measurement cache."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.path = folder / "verdict.json"
        self.enabled = enabled

    def load(self, key: str) -> list[dict] | None:
        if not self.enabled:
            return None
        saved = _read_versioned(self.path, "verdict", None)
        return saved["problems"] if saved and saved.get("key") == key else None

    def save(self, key: str, problems: list[dict]) -> None:
        if self.enabled:
            write_audit_file(self.path, {"version": CACHE_VERSION, "verdict": {"key": key, "problems": problems}})


def verdict_key(files: list[tuple[str, str, str, int, int]], settings: dict) -> str:
    """SHA-256 over the audit's settings and (relative path, split, class, size, mtime_ns) per file."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update("\n".join(f"{rel}\t{split}\t{name}\t{size}\t{mtime}"
                            for rel, split, name, size, mtime in files).encode())
    return digest.hexdigest()


def _read_versioned(path: Path, field: str, default):
    """`field` of a JSON file this module wrote with CACHE_VERSION; `default` when it is missing,
    damaged or of another version: a lost cache costs one slow audit, never a wrong answer."""
    try:
        data = json.loads(path.read_text())
        return data[field] if data.get("version") == CACHE_VERSION else default
    except (ValueError, KeyError, OSError, AttributeError):
        return default


class DigestCache:
    """SHA-256 of files hashed before, by absolute path, reused while the file's size, mtime and
    inode are unchanged (as the measurement cache reuses measurements): a shards folder is read
    whole once to verify it, not at every start (at 100 GB that read would be most of a start)."""

    def __init__(self, folder: Path, enabled: bool = True):
        self.path = folder / "digests.json"
        self.enabled = enabled
        self.entries: dict[str, dict] = _read_versioned(self.path, "files", {}) if enabled else {}
        self._changed = False

    @staticmethod
    def _identity(stat: os.stat_result) -> list[int]:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ino]

    def known(self, file: Path) -> str | None:
        """The digest recorded for `file` when it is still the same file, else None."""
        entry = self.entries.get(str(file))
        try:
            return entry["sha256"] if entry and entry["identity"] == self._identity(file.stat()) else None
        except OSError:
            return None

    def record(self, file: Path, digest: str, stat: os.stat_result) -> None:
        """`stat` taken before hashing: a file changed while it was read is not recorded as its old self."""
        self.entries[str(file)] = {"identity": self._identity(stat), "sha256": digest}
        self._changed = True

    def save(self) -> None:
        if self.enabled and self._changed:
            write_audit_file(self.path, {"version": CACHE_VERSION, "files": self.entries})
            self._changed = False
