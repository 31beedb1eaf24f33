"""The filesystem seam: every file the checkpoint code writes goes through an FS.

Tests swap in FaultyFS to fail the N-th write-class operation, the way SQLite's
test VFS fails its N-th I/O call, and check that nothing committed is harmed.
"""

import contextlib
import errno
import hashlib
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path


class FS:
    """Plain, durable file operations. `ops` counts write-class operations."""

    def __init__(self):
        self.ops = 0

    def _op(self, name: str, path) -> None:
        self.ops += 1

    def mkdir(self, path) -> None:
        self._op("mkdir", path)
        os.mkdir(path, 0o700)

    def write_bytes(self, path, data, sync: bool = True) -> None:
        """Create `path` (it must not exist), write all of `data`, fsync, close.

        `data` is a bytes-like object or a list of them (written in order, no join). With
        sync=False the fsync is left to a later fsync_all, which must come before anything relies
        on the file."""
        self._op("write_bytes", path)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        try:
            _write_all(fd, _chunks(data))
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def fsync_all(self, paths, wait: bool = True) -> list[Future]:
        """fsync files and folders (one operation), all at once on the I/O threads: the
        filesystem commits concurrent fsyncs together, so a batch costs little more than one.
        With wait=False it returns at once with the fsyncs' futures (the caller must wait for
        them, e.g. while it hashes, before anything relies on the files)."""
        paths = list(paths)
        self._op("fsync_all", paths[0])
        pending = [io_pool().submit(fsync_path, p) for p in paths]
        if wait:
            for f in pending:
                f.result()
        return pending

    def fsync_dir(self, path) -> None:
        self._op("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rename(self, src, dst) -> None:
        """os.replace for files; a plain rename for directories (dst must not exist)."""
        self._op("rename", src)
        if Path(src).is_dir():
            if os.path.lexists(dst):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
            os.rename(src, dst)
        else:
            os.replace(src, dst)

    def rmtree(self, path) -> None:
        self._op("rmtree", path)
        shutil.rmtree(path)


class FaultyFS(FS):
    """Raises OSError(err) at the `fail_at`-th write-class operation (1-based), once.

    A failing write_bytes with ENOSPC leaves a partial file behind, as a full disk does.
    """

    def __init__(self, fail_at: int, err: int = errno.ENOSPC):
        super().__init__()
        self.fail_at = fail_at
        self.err = err
        self.failed = False

    def _op(self, name: str, path) -> None:
        super()._op(name, path)
        if self.ops == self.fail_at:
            self.failed = True
            if name == "write_bytes" and self.err == errno.ENOSPC:
                return  # write_bytes fails itself, after a partial write
            raise OSError(self.err, os.strerror(self.err), str(path))

    def write_bytes(self, path, data, sync: bool = True) -> None:
        if self.ops + 1 == self.fail_at and self.err == errno.ENOSPC:
            self._op("write_bytes", path)
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            try:
                whole = b"".join(memoryview(c).cast("B") for c in _chunks(data))
                _write_all(fd, [whole[: len(whole) // 2]])
            finally:
                os.close(fd)
            raise OSError(self.err, os.strerror(self.err), str(path))
        super().write_bytes(path, data, sync)


def _chunks(data) -> list:
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


def _write_all(fd: int, chunks: list) -> None:
    """Write every buffer, in order, with as few writev calls as the kernel allows."""
    views = [v for v in (memoryview(c).cast("B") for c in chunks) if v.nbytes]
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i : i + _IOV_MAX])
        while n:  # skip what was written; a partial write leaves the rest of a view
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def io_pool() -> ThreadPoolExecutor:
    """The process's I/O threads (hashing, fsync, checks next to a write): started once, on first
    use, so a checkpoint never waits for threads to be created. hashlib, numpy, writev and fsync
    release the GIL, so they overlap each other and the training loop."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ftctl-io")
        return _POOL


# --------------------------------------------------------------------------- durable writes by path
# For files written once (workspace setup, the demo model): after these return, the data and the
# directory entry survive a power loss.


def sha256_file(path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (a model's weights need not fit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path) -> None:
    """fsync a file, or a folder (which makes the entries created in it durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if os.path.isdir(path) else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path, data: bytes, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically: temp file, fsync, rename, fsync of the folder."""
    replace_durably(path, lambda f: f.write(data), mode)


def replace_durably(path, write, mode: int = 0o600) -> None:
    """Replace `path` with what `write(binary_file)` writes: temp file, fsync, rename, fsync of the folder.

    The temp name is hidden and does not end like `path` (mlx_lm.load globs model*.safetensors).
    On failure the temp file is removed and `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY, mode), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def make_dirs(path, made: list, mode: int = 0o700) -> None:
    """Create `path` and its missing parents, outermost first, each fsynced with its parent.

    Appends every folder it creates to `made` as it goes, so a caller can undo exactly those."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for d in reversed(missing):
        os.mkdir(d, mode)
        made.append(d)
        fsync_path(d)
        fsync_path(d.parent)


class UnreadableFile(ValueError):
    """A user's input file cannot be read; str() says why in one line."""


def read_input(path: Path, what: str = "file") -> bytes:
    """All the bytes of a file a user named (data, validation, test set), or UnreadableFile."""
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise UnreadableFile(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UnreadableFile(f"{what} {path} is a directory, not a JSONL file") from None
    except OSError as e:
        raise UnreadableFile(f"cannot read {what} {path}: {e.strerror}") from None
