"""File I/O that never leaves a half-written result behind.

Every result file is written to a temporary sibling and renamed into place, so an interrupted
run leaves either the old file or the new one, never a truncated one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from immunize.errors import ImmunizeError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; results should have the permissions of any other new file.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---- where outputs go: checked before any work, given the modes of ordinary new files -------------

def check_output_dir(path: str | Path, option: str) -> Path:
    """Refuse, in one line naming ``option``, an output directory this process cannot write into.

    Commands call this before loading a model or data, so a bad location fails at once instead of
    after the work. It leaves nothing behind: a missing directory is not made, the probe file
    goes into (and out of) its nearest existing ancestor.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise ImmunizeError(f"{option} {path}: is a file, not a directory")
    _check_writable(path, option, shown=path)
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse, in one line naming ``option``, an output file this process cannot write."""
    path = Path(path)
    if path.is_dir():
        raise ImmunizeError(f"{option} {path}: is a directory, not a file")
    _check_writable(path.parent, option, shown=path)
    return path


def _check_writable(directory: Path, option: str, *, shown: Path) -> None:
    base = next(p for p in (directory, *directory.parents) if os.path.lexists(p))
    if not base.is_dir():
        raise ImmunizeError(f"{option} {shown}: {base} is a file, not a directory")
    # Trying is the only sure test: os.access ignores read-only mounts and says yes to root.
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".immunize-probe.")
    except OSError as err:
        what = "not writable" if base == directory else "cannot create it"
        raise ImmunizeError(f"{option} {shown}: {what} ({err.strerror or err})") from None
    os.close(fd)
    os.unlink(probe)


def share_weights(directory: str | Path) -> None:
    """Give every ``*.safetensors`` file under ``directory`` the mode of any other new file.

    safetensors >= 0.8 writes through a private temporary file and renames it into place, so
    weights come out 0600 whatever the umask (safetensors#782): nobody but their owner could load
    a saved model, though its config and tokenizer beside it are readable.
    """
    mode = 0o666 & ~_umask()
    for path in Path(directory).rglob("*.safetensors"):
        if path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)


def publish_dir(staging: str | Path, target: str | Path) -> Path:
    """Swap ``staging`` (a directory built beside ``target``) in as ``target``; a reader sees the old
    directory or the new one, never a mix, and a failed swap puts the old one back.

    Everything in ``staging`` was just made, so all of it gets the modes of ordinary new files
    first: ``tempfile.mkdtemp`` makes 0700 directories and safetensors 0600 files, whatever the umask.
    """
    staging, target = Path(staging), Path(target)
    mask = _umask()
    for path in (staging, *staging.rglob("*")):
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
    if not os.path.lexists(target):
        os.replace(staging, target)
        return target
    old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
    os.replace(target, old / target.name)
    try:
        os.replace(staging, target)
    except BaseException:
        os.replace(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return target


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=_json_default) + "\n"


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, to_json(obj))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    text = "".join(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n" for row in rows)
    return atomic_write_text(path, text)


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int = 0) -> ImmunizeError:
    return ImmunizeError(f"{path}: not UTF-8 text (byte {offset + err.start}: {err.reason})")


def _open_error(path: Path, err: OSError) -> ImmunizeError:
    if isinstance(err, FileNotFoundError):
        return ImmunizeError(f"{path}: file not found")
    return ImmunizeError(f"{path}: cannot read ({err.strerror or err})")


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; bytes that are not UTF-8 raise naming the file and the byte offset.

    A leading byte-order mark is dropped: spreadsheet exports write one, and it is not content.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise _open_error(path, err) from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def read_json(path: str | Path) -> Any:
    path = Path(path)
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as err:
        raise ImmunizeError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, row)``; a malformed or non-object line raises naming file and line.

    Lines are read as bytes and decoded one by one, so a large file streams and a byte that is
    not UTF-8 is named by its offset in the file.
    """
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as err:
        raise _open_error(path, err) from None
    offset = 0
    with handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, offset) from None
            offset += len(raw)
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ImmunizeError(f"{path}:{lineno}: malformed JSON row ({err.msg})") from None
            if not isinstance(row, dict):
                raise ImmunizeError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | Path) -> list[dict]:
    return [row for _, row in iter_jsonl(path)]


_FILE_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed, memoized per process by (path, size, mtime)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _FILE_HASHES[key] = digest.hexdigest()
    return _FILE_HASHES[key]
