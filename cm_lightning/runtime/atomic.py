"""Every file the project writes appears whole or not at all: written to a temporary file beside its
destination, flushed to disk, then renamed over it (``os.replace`` is atomic on one file system). A kill or a
full disk mid-write leaves the previous file (or none), never a truncated one, and the temporary file is
removed. A full disk stops with one line naming the file."""

import contextlib
import errno
import os
import tempfile
from pathlib import Path

from cm_lightning.errors import ConfigError


@contextlib.contextmanager
def replacing(path):
    """Yields a temporary path beside ``path`` to write; on success it replaces ``path``, on any failure it is
    removed (and ENOSPC, a full disk, becomes a ConfigError naming ``path``)."""
    path = Path(str(path))
    if path.is_dir():
        raise ConfigError(f"{path} is a directory, which a file would replace; name a file to write instead")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as exc:  # read-only, or a file where a folder should be: before any work is lost
        raise ConfigError(f"{path} cannot be written ({exc.strerror or exc}); choose a writable location") from None
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        if exc.errno == errno.ENOSPC:
            raise ConfigError(f"{path} could not be written: the disk is full; free space and run again") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> Path:
    with replacing(path) as tmp:
        tmp.write_text(text)
    return Path(str(path))


def write_bytes(path, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(str(path))
