"""Files that are either wholly there or not at all, and files' content digests.

Every file the project writes goes through `atomic_output`: the content goes to a temporary file in
the same folder (a rename is only atomic within one file system), which replaces the target only
once it is complete, so a reader or a killed run never sees half a file and a failed write leaves
the previous file as it was. `durable=True` adds the fsyncs that make the result survive a power
cut too: the file's bytes before the rename, the folder's entry after it. Checkpoints need that;
caches and pictures, which can be made again, do not pay for it.

Every file gets a new file's permissions under the umask (0644 under umask 022), as `torch.save` or
`cp` to a new name give, also when it replaces one. Writers such as safetensors' `save_file` make
their file 0600 whatever the umask; left so, teammates and serving accounts could not read models.

A write the machine refuses (a full disk, a quota, a read-only or unwritable folder) is not the
user's input and not a bug: `write_failed` turns it into a `WriteFailed`, one line and exit code 1.
Logs are appended a whole line or nothing (`append_line`), and the temporary files and folders a
killed writer left behind are removed by the next writer of the same name, once their process is gone.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from configs.errors import ProjectError


class WriteFailed(ProjectError):
    """The machine refused a write: a full disk, a quota, a read-only file system, no permission.
    What was written before is intact and nothing half-written is left; exit code 1 (a fault, not
    bad input: the same command works once there is room)."""

    exit_code = 1


# errno -> what it means for the user; anything else is said in the system's words.
_WRITE_FAULTS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up",
                 errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied",
                 errno.EPERM: "permission denied", errno.EFBIG: "the file is too large for the file system"}


def is_write_fault(error: BaseException) -> bool:
    """Whether `error` is the machine refusing a write (see _WRITE_FAULTS), not a bug or bad input."""
    return isinstance(error, OSError) and error.errno in _WRITE_FAULTS


_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) quote an errno


def write_fault_in(error: BaseException) -> OSError | None:
    """The refused write behind `error`, for libraries that wrap an OSError in their own exception
    (torch.onnx.export) or only quote it (safetensors' "I/O error: ... (os error 28)"): `error`
    itself or an exception it was raised from, else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if is_write_fault(error):
            return error
        quoted = _RUST_OS_ERROR.search(str(error)) if not isinstance(error, OSError) else None
        if quoted and int(quoted.group(1)) in _WRITE_FAULTS:
            code = int(quoted.group(1))
            return OSError(code, os.strerror(code))
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remedy(error: OSError) -> str:
    """What frees a refused write: room on the disk, or a folder that may be written."""
    return "free space there" if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"


_TEMPORARY = re.compile(r"^\.(.+)\.tmp-\d+(?:\.[^.]*)?$")  # the names atomic_output and atomic_folder give


def _as_named(filename) -> str:
    """`filename` with each temporary name in it (`.x.json.tmp-123.json`) put back as the name the user
    knows (`x.json`): an error line names what the user asked for, not a file that is gone by then."""
    parts = Path(str(filename)).parts
    return str(Path(*[(_TEMPORARY.match(p).group(1) if _TEMPORARY.match(p) else p) for p in parts])) if parts else ""


def write_failed(path: str | Path, error: OSError, then: str = "") -> WriteFailed:
    """One line for a write of `path` the machine refused: what failed, why, and `then` (what is
    intact, what to do; "{remedy}" in it becomes `remedy(error)`). Raise it `from None`: the
    traceback says nothing the line does not."""
    why = _WRITE_FAULTS.get(error.errno) or error.strerror or type(error).__name__
    named = _as_named(error.filename) if error.filename else ""
    where = f" ({named})" if named and named != str(path) else ""
    then = then.replace("{remedy}", remedy(error))
    return WriteFailed(f"could not write {path}: {why}{where}" + (f"; {then}" if then else ""))


def machine_fault(error: OSError) -> WriteFailed:
    """One line for a refused write that no writer turned into its own (launch/cli.py's last net)."""
    why = _WRITE_FAULTS.get(error.errno) or error.strerror or type(error).__name__
    where = f" ({_as_named(error.filename)})" if error.filename else ""
    # Not known to be a write here: a permission error may be a read of a file the user named.
    fix = "check its permissions" if error.errno in (errno.EACCES, errno.EPERM) else remedy(error)
    return WriteFailed(f"{why}{where}; {fix} (or choose another folder) and run again")


def append_line(path: str | Path, line: str, *, durable: bool = False) -> None:
    """Append `line` and a newline to `path` as a whole line or not at all: a write cut short (a
    full disk) is cut back off before the error is raised, so the log stays whole lines."""
    data = (line + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, new_file_mode())
    try:
        size = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            if durable:
                os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # room to shrink a file is always there
            raise
    finally:
        os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def remove_dead_leftovers(path: Path) -> list[Path]:
    """Remove what killed writers of `path` left beside it: `.NAME.tmp-PID` files and folders (the
    names atomic_output and atomic_folder give) whose process PID no longer exists on this machine.
    A live writer's, and anything named otherwise, is left alone. Returns what was removed."""
    removed = []
    prefix = f".{path.name}.tmp-"
    try:
        siblings = list(path.parent.iterdir()) if path.parent.is_dir() else []
    except OSError:
        return removed
    for leftover in siblings:
        if not leftover.name.startswith(prefix):
            continue
        digits = leftover.name[len(prefix):]
        if path.suffix and digits.endswith(path.suffix):
            digits = digits[: -len(path.suffix)]
        if not digits.isdigit() or int(digits) == os.getpid() or _alive(int(digits)):
            continue
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


def fsync_file(path: str | Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new file inside folder `path` durable (POSIX keeps names in the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask can only be read
    by setting it, which for a moment changes it for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode(executable: bool = False) -> int:
    """The mode open() or mkdir would give a new file (executable: or folder) under the umask."""
    return (0o777 if executable else 0o666) & ~current_umask()


def give_mode(written: Path) -> None:
    """Give the file `written` a new file's mode under the umask, whatever mode its writer chose.
    Also when it replaces a file: the umask is the user's policy, and files an older version left
    0600 become readable the next time they are written (a resume)."""
    os.chmod(written, new_file_mode(executable=bool(os.stat(written).st_mode & 0o111)))


@contextmanager
def atomic_output(path: str | Path, *, durable: bool = False) -> Iterator[Path]:
    """Yields a temporary path beside `path` to write to; on a clean exit it replaces `path`.

    The temporary name keeps the suffix, for writers that pick the format from it (matplotlib).
    On an exception the temporary file is removed and `path` is left untouched.

        with atomic_output(out) as tmp:
            fig.savefig(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        yield tmp
        give_mode(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
        if durable:
            fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `path` to fill; on a clean exit it becomes `path`.

    `path` must not exist, or be an empty folder: a folder of results is never merged into or
    replaced. On an exception the temporary folder and everything in it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_leftovers(path)  # of killed writers of the same folder (up to gigabytes of partial shards)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run of this pid number
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file() and not child.is_symlink():
                give_mode(child)  # new files all: the folder is new, or was empty
        for child in tmp.iterdir():
            if child.is_file():
                fsync_file(child)
        if path.is_dir():
            path.rmdir()  # empty, or this raises and nothing is replaced
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str, *, durable: bool = False) -> Path:
    path = Path(path)
    with atomic_output(path, durable=durable) as tmp:
        tmp.write_text(text)
    return path


def atomic_write_json(path: str | Path, obj: Any, *, indent: int | None = None, sort_keys: bool = False,
                      durable: bool = False) -> Path:
    # Python's json writes floats with repr, which reads back bit for bit.
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys), durable=durable)


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def trim_jsonl(path: str | Path, key: str, last: int) -> int:
    """Keep the lines of a JSON-lines log whose `key` is at most `last` (what a resumed run has
    not trained again), replacing the file atomically. A line that does not parse (a write cut by
    a kill or a full disk) is dropped; returns how many were."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept, damaged = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict) and isinstance(record.get(key), (int, float)) and record[key] <= last:
            kept.append(line)
        elif not isinstance(record, dict) or key not in record:
            damaged += 1
    try:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    except OSError as e:
        if not is_write_fault(e):
            raise
        raise write_failed(path, e, "it is as it was; {remedy} and resume again") from None
    return damaged


__all__ = ["WriteFailed", "append_line", "atomic_folder", "atomic_output", "atomic_write_json", "atomic_write_text",
           "current_umask", "fsync_dir", "fsync_file", "is_write_fault", "machine_fault", "new_file_mode", "remove_dead_leftovers",
           "sha256_file", "trim_jsonl", "write_failed", "write_fault_in"]
