"""Writing files that cannot lose data: what `minidiff quantize` and `minidiff trace` write goes through here.

    unique temporaries   every file is first written as `.NAME.<pid>.<random>.partial` beside its final
                         name and renamed over it only when complete, so a reader never sees half a file
                         and two processes never write the same temporary
    one writer           `destination_lock(folder)` holds an exclusive lock on the folder while a
                         checkpoint is written there; a second writer stops with an error line
    cleanup              `Temporaries` removes whatever was not finished when an error, Ctrl-C or
                         SIGTERM (turned into KeyboardInterrupt by the CLI) ends the run
    errors               a full disk, a missing or read-only folder, a path under a regular file: one
                         MinidiffError line naming the path
"""

from __future__ import annotations

import os
import secrets
from contextlib import contextmanager
from pathlib import Path

from .errors import MinidiffError


def temp_path(final: Path) -> Path:
    """A fresh hidden temporary name in the folder of `final`."""
    final = Path(final)
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.partial")


def io_error(path, e: OSError) -> MinidiffError:
    return MinidiffError(f"{path}: cannot write ({e.strerror or e})")


class Temporaries:
    """The temporaries of one run: `new(final)` names one, `commit(tmp, final)` renames it into place,
    and leaving the `with` block by an exception removes every one not committed."""

    def __init__(self):
        self.pending: set[Path] = set()

    def new(self, final: Path) -> Path:
        tmp = temp_path(final)
        self.pending.add(tmp)
        return tmp

    def commit(self, tmp: Path, final: Path) -> None:
        try:   # ordinary permissions (safetensors creates its files 0600): what the umask allows
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, final)
        except OSError as e:
            raise io_error(final, e)
        self.pending.discard(tmp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for tmp in self.pending:
            try:
                tmp.unlink()
            except OSError:
                pass
        self.pending.clear()
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_file(path: Path, data: bytes | str) -> None:
    """Write `data` to a new file `path` and fsync it (for temporaries: see `write_atomic`)."""
    try:
        with open(path, "xb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise io_error(path, e)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` to `path` through a fresh temporary renamed over `path` once complete."""
    with Temporaries() as t:
        tmp = t.new(Path(path))
        write_file(tmp, data)
        t.commit(tmp, Path(path))


def check_output_file(path: Path, what: str) -> Path:
    """An output file path that can be written: its folder exists and is a folder, it is not a folder."""
    path = Path(path)
    if path.is_dir():
        raise MinidiffError(f"{what} {path}: is a folder")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.exists():
        raise MinidiffError(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise MinidiffError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise MinidiffError(f"{what} {path}: folder {parent} is not writable")
    return path


@contextmanager
def destination_lock(folder: Path):
    """An exclusive lock on the folder itself for the time of the `with` block (POSIX flock on the
    folder's descriptor: nothing is created in it; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError as e:
        raise MinidiffError(f"{folder}: cannot open ({e.strerror})")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise MinidiffError(f"{folder}: another minidiff process is writing there now")
        yield
    finally:
        os.close(fd)
