"""The checkpoint commit protocol.

A checkpoint is a directory <job_dir>/checkpoints/step-00000040/ holding
  adapters.safetensors   the trained weights (what mlx-lm saves: the adapter, or for a full
                         fine-tune the weights of the trained layers)
  adapter_config.json    what mlx_lm.load(model, adapter_path=dir) needs
  optimizer.safetensors  tree_flatten(optimizer.state)
  state.json             step counters, data cursor, seed, losses
  manifest.json          sha256 and size of every file above; written last
It is written under .tmp-step-00000040-<pid>/, every file fsynced, then the
directory fsynced and renamed into place and the parent fsynced. A directory
with the final name always has every file its manifest lists; verify_checkpoint
checks the hashes before anything is loaded from it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import re
import struct
import threading
import time
from concurrent.futures import wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import msgspec

# MLX is imported where arrays are written or read: recovery and status never load it
if TYPE_CHECKING:
    import mlx.core as mx

from ftctl.core.early_stopping import ValWatch
from ftctl.events.types import CheckpointRecord

from .faults import crash_point
from .fs import FS, io_pool, make_dirs

FORMAT = "ftctl-checkpoint"
FORMAT_VERSION = 1

ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
MANIFEST = "manifest.json"
REQUIRED = {
    "checkpoint": (ADAPTERS, ADAPTER_CONFIG, OPTIMIZER, STATE),
    "adapter": (ADAPTERS, ADAPTER_CONFIG),
}

_STEP_DIR = re.compile(r"^step-(\d{8})$")


class Cursor(msgspec.Struct):
    """Position in the training data: the next batch is order(epoch)[position]."""

    epoch: int
    position: int


class TrainState(msgspec.Struct, kw_only=True):
    job_step: int
    global_step: int
    cursor: Cursor
    seed: int
    eval_count: int = 0
    trained_tokens: int = 0
    train_loss: float | None = None
    val_loss: float | None = None
    config_sha256: str | None = None
    world_size: int = 1  # ranks it was trained on: a resume on another number needs `--reshard`
    val_step: int | None = None  # the step val_loss was measured at
    # the validation losses so far (best, early stopping: core.early_stopping.watch), and early stopping's
    # decision once taken: a resume from this checkpoint decides exactly as the first run did
    watch: ValWatch = msgspec.field(default_factory=ValWatch)
    stopped_early: str | None = None


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    adapters: dict[str, mx.array]
    adapter_config: dict
    optimizer: dict[str, mx.array]
    state: TrainState


class CheckpointCorrupt(Exception):
    def __init__(self, path, reason: str, file: str | None = None):
        self.path = str(path)
        self.reason = reason
        self.file = file
        super().__init__(f"checkpoint {self.path} is unusable: {reason}")


def checkpoints_dir(job_dir) -> Path:
    return Path(job_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_step(path) -> int:
    m = _STEP_DIR.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a checkpoint directory name (step-NNNNNNNN)")
    return int(m.group(1))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_DTYPES = {  # MLX dtype name -> safetensors dtype
    "bool": "BOOL",
    "uint8": "U8",
    "uint16": "U16",
    "uint32": "U32",
    "uint64": "U64",
    "int8": "I8",
    "int16": "I16",
    "int32": "I32",
    "int64": "I64",
    "float16": "F16",
    "bfloat16": "BF16",
    "float32": "F32",
    "float64": "F64",
    "complex64": "C64",
}


class Tensors:
    """Named MLX arrays to be written as one safetensors file. Made in the training loop's thread,
    which evaluates them (MLX work stays there); laid out as a file by safetensors_chunks later, on
    the writer's thread: headers and buffer views need no MLX call, and evaluated MLX arrays never
    change, so holding them is the snapshot."""

    __slots__ = ("arrays",)

    def __init__(self, arrays: dict[str, mx.array]):
        import mlx.core as mx

        mx.eval(list(arrays.values()))
        self.arrays = arrays


def safetensors_chunks(arrays: dict[str, mx.array]) -> list:
    """The safetensors file of `arrays` as a list of buffers, without copying the data:
    8-byte little-endian header length, JSON header (padded to 8 bytes), then each
    array's bytes. Keys are sorted, so equal arrays give equal bytes. No MLX call on evaluated
    arrays (a strided view is copied out in C order by memoryview.tobytes), so any thread may
    lay out arrays another thread evaluated."""
    header, views, offset = {}, [], 0
    for key in sorted(arrays):
        a = arrays[key]
        view = memoryview(a)
        if not view.c_contiguous:
            view = memoryview(view.tobytes())
        header[key] = {
            "dtype": _DTYPES[str(a.dtype).rpartition(".")[2]],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + view.nbytes],
        }
        offset += view.nbytes
        views.append(view)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return [struct.pack("<Q", len(head)), head, *views]


# the exponent bits of each float format: all ones means inf or NaN
_NONFINITE = {
    "F16": ("uint16", 0x7C00),
    "BF16": ("uint16", 0x7F80),
    "F32": ("uint32", 0x7F800000),
    "F64": ("uint64", 0x7FF0000000000000),
}


def nonfinite_tensors(chunks: list, block: int = 1 << 20) -> list[str]:
    """The names of the tensors with an inf or NaN in a safetensors_chunks list, read from the
    buffers with numpy bit tests (no MLX call, the GIL released in each block): safe and cheap on
    a background thread while training goes on."""
    import numpy as np  # here, not at the top: recover and status import this module and never need it

    header = json.loads(bytes(chunks[1]))
    bad = []
    for key, view in zip(sorted(header), chunks[2:]):
        kind = _NONFINITE.get(header[key]["dtype"])
        if kind is None or not view.nbytes:
            continue
        bits = getattr(np, kind[0])
        words = np.frombuffer(view, dtype=bits)
        mask = bits(kind[1])
        for i in range(0, words.size, block):
            part = words[i : i + block]
            if np.any((part & mask) == mask):
                bad.append(key)
                break
    return bad


def read_safetensors(data: bytes) -> dict[str, mx.array]:
    import mlx.core as mx

    return mx.load(io.BytesIO(data), format="safetensors")


def save_checkpoint(job_dir, ckpt: Checkpoint, fs: FS | None = None) -> CheckpointRecord:
    """Atomically write checkpoint step-<job_step> under job_dir; durable on return.

    On OSError the temp directory is removed (when possible) and the error re-raised;
    other checkpoints are never touched.
    """
    return write_checkpoint(job_dir, checkpoint_files(ckpt), ckpt.state, fs)


def checkpoint_files(ckpt: Checkpoint) -> dict:
    """The files of a checkpoint, as write_checkpoint takes them: the arrays evaluated, here in the
    caller's thread (the only MLX work), and held; everything else (headers, buffer views that
    share the arrays' memory, hashing, writing) is left to the writer. MLX arrays never change once
    evaluated, so the result is a snapshot that another thread may write while training goes on."""
    return {
        ADAPTERS: Tensors(ckpt.adapters),
        ADAPTER_CONFIG: _json_bytes(ckpt.adapter_config),
        OPTIMIZER: Tensors(ckpt.optimizer),
        STATE: msgspec.json.encode(ckpt.state),
    }


def write_checkpoint(
    job_dir,
    files: dict,
    st: TrainState,
    fs: FS | None = None,
    check: Callable[[dict], None] | None = None,
) -> CheckpointRecord:
    """Write checkpoint_files(...) as checkpoint step-<st.job_step>: pure I/O, no MLX call, so it
    may run on a background thread (see CheckpointWriter). `check(buffers)` runs beside the write
    on the files' buffers (name -> list of buffers); if it raises, nothing is committed (the temp
    folder goes) and its error is the write's."""
    fs = fs or FS()
    parent = checkpoints_dir(job_dir)
    for d in (parent.parent, parent):
        if not d.is_dir():
            fs.mkdir(d)
            fs.fsync_dir(d.parent)
    meta = {"kind": "checkpoint", "step": st.job_step, "global_step": st.global_step}
    path, manifest_sha, total = _commit(parent, step_dir_name(st.job_step), files, meta, fs, check)
    return CheckpointRecord(
        step=st.job_step,
        global_step=st.global_step,
        path=str(path),
        manifest_sha256=manifest_sha,
        bytes=total,
        train_loss=st.train_loss,
        val_loss=st.val_loss,
        val_step=st.val_step,
    )


class CheckpointWriter:
    """Writes checkpoints on a background thread while training goes on; at most one in flight.

    ``submit`` waits for the previous write first (and says how long it waited), so checkpoints are
    written, renamed and reported strictly in order. ``on_written(record)`` runs on the writer
    thread right after the rename (the worker reports the checkpoint there; the daemon commits it).
    An error of the write (OSError: ENOSPC, EIO...) is kept and raised, as it was, by the next
    ``check``, ``submit`` or ``wait`` in the training thread: the worker's exit path sees the same
    exception a synchronous save would have raised. The thread is started once and fed through a
    queue (handing over a checkpoint does not wait for a new thread to be scheduled); it is a daemon
    thread: a kill or an ``os._exit`` abandons a write half-way, which leaves only a ``.tmp-`` folder."""

    def __init__(self, job_dir, fs: FS | None, on_written: Callable[[CheckpointRecord], None]):
        self.job_dir, self.fs, self.on_written = job_dir, fs or FS(), on_written
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_s = 0.0  # the last write's duration, on the writer thread

    def submit(
        self, files: dict, state: TrainState, check: Callable[[dict], None] | None = None
    ) -> float:
        """Start writing; return the seconds spent waiting for the previous write. ``check`` runs
        beside the write (see write_checkpoint): if it raises, nothing is committed and that error
        is the write's."""
        t0 = time.perf_counter()
        self.wait()
        waited = time.perf_counter() - t0
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve, daemon=True, name="checkpoint-writer"
            )
            self._thread.start()
        self._idle.clear()
        self._jobs.put((files, state, check))
        return waited

    def busy(self) -> bool:
        return not self._idle.is_set()

    def check(self) -> None:
        """Raise the error of a finished write, if it failed (once)."""
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def wait(self) -> None:
        """Wait for the write in flight, then check it."""
        self._idle.wait()
        self.check()

    def drain(self) -> BaseException | None:
        """Wait for the write in flight and return its error instead of raising it: for an exit path
        that already has an exception of its own to report."""
        try:
            self.wait()
        except BaseException as e:  # noqa: BLE001 - handed back, not swallowed
            return e
        return None

    def close(self) -> None:
        """Wait for the write in flight (its error stays for check) and end the thread."""
        self._idle.wait()
        if self._thread is not None:
            self._jobs.put(None)
            self._thread = None

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._write(*job)
            self._idle.set()

    def _write(self, files: dict, state: TrainState, check) -> None:
        t0 = time.perf_counter()
        try:
            record = write_checkpoint(self.job_dir, files, state, self.fs, check)
            self.write_s = time.perf_counter() - t0
            self.on_written(record)
        except BaseException as e:  # noqa: BLE001 - raised again in the training thread
            self._error = e


def verify_checkpoint(path) -> None:
    """Raise CheckpointCorrupt unless every file of the manifest is present and intact."""
    _read_verified(path)


def load_checkpoint(path) -> Checkpoint:
    """Verify, then load. The bytes hashed are the bytes loaded."""
    files = _read_verified(path, kind="checkpoint")
    try:
        state = msgspec.json.decode(files[STATE], type=TrainState)
        adapters = read_safetensors(files[ADAPTERS])
        optimizer = read_safetensors(files[OPTIMIZER])
    except (msgspec.DecodeError, ValueError, RuntimeError) as e:
        raise CheckpointCorrupt(path, f"cannot decode its contents: {e}") from e
    return Checkpoint(adapters, json.loads(files[ADAPTER_CONFIG]), optimizer, state)


def list_checkpoint_dirs(job_dir) -> list[Path]:
    """Directories named step-NNNNNNNN under <job_dir>/checkpoints, by step (not verified)."""
    parent = checkpoints_dir(job_dir)
    if not parent.is_dir():
        return []
    dirs = [p for p in parent.iterdir() if _STEP_DIR.match(p.name) and p.is_dir()]
    return sorted(dirs, key=checkpoint_step)


def temp_dirs(job_dir) -> list[Path]:
    """Leftover .tmp-* directories of interrupted saves and publishes (safe to delete)."""
    found = []
    for parent in (Path(job_dir), checkpoints_dir(job_dir)):
        if parent.is_dir():
            found += [p for p in parent.iterdir() if p.name.startswith(".tmp-")]
    return sorted(found)


def publish_adapter(job_dir, checkpoint_path, fs: FS | None = None) -> tuple[Path, str]:
    """Atomically write <job_dir>/adapters/ from a verified checkpoint.

    Returns (adapter_dir, sha256 of adapters.safetensors).
    """
    fs = fs or FS()
    src = _read_verified(checkpoint_path, kind="checkpoint")
    files = {ADAPTERS: src[ADAPTERS], ADAPTER_CONFIG: src[ADAPTER_CONFIG]}
    state = msgspec.json.decode(src[STATE], type=TrainState)
    meta = {
        "kind": "adapter",
        "step": state.job_step,
        "global_step": state.global_step,
        "source": Path(checkpoint_path).name,
    }
    path, _, _ = _commit(Path(job_dir), "adapters", files, meta, fs)
    return path, sha256(files[ADAPTERS])


def export_problem(dest) -> str | None:
    """Why ``dest`` (a user's adapter_path) may not receive an adapter, or None: it is free, an empty
    folder, or a folder ftctl wrote (its manifest says so). Anything else is not ftctl's to replace."""
    d = Path(dest)
    if not os.path.lexists(d):
        parent = next((p for p in d.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            return f"{parent} is a file, not a folder"
        return None
    if d.is_symlink() or not d.is_dir():
        return f"{d} exists and is not a folder"
    if not any(d.iterdir()):
        return None
    try:
        manifest = json.loads((d / MANIFEST).read_bytes())
        if manifest.get("format") == FORMAT and manifest.get("kind") == "adapter":
            return None
    except (OSError, ValueError, AttributeError):
        pass
    shown = ", ".join(sorted(p.name for p in d.iterdir())[:4])
    return (
        f"{d} already holds files ftctl did not write ({shown}; mlx_lm.lora's?), and ftctl never "
        "replaces what it did not write"
    )


def export_adapter(adapter_dir, dest, fs: FS | None = None) -> Path:
    """Publish a verified adapter folder (jobs/<id>/adapters) at ``dest`` too, atomically (temp folder
    beside it, fsync, rename), in mlx-lm's layout plus ftctl's manifest. ValueError if ``dest`` is not
    free for it (export_problem)."""
    fs = fs or FS()
    problem = export_problem(dest)
    if problem:
        raise ValueError(problem)
    src = _read_verified(adapter_dir, kind="adapter")
    meta = json.loads((Path(adapter_dir) / MANIFEST).read_bytes())
    files = {f: src[f] for f in (ADAPTERS, ADAPTER_CONFIG)}
    keep = {k: meta[k] for k in ("step", "global_step", "source") if k in meta}
    dest = Path(dest)
    make_dirs(dest.parent, [])
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()  # an empty folder the user made: the adapter folder takes its place
    path, _, _ = _commit(dest.parent, dest.name, files, {"kind": "adapter", **keep}, fs)
    return path


def adapter_sha256(path) -> str:
    """sha256 of the adapters.safetensors bytes in a checkpoint or adapter directory."""
    return sha256((Path(path) / ADAPTERS).read_bytes())


def discard_dir(path, fs: FS | None = None) -> None:
    """Delete a checkpoint or adapter directory so that it vanishes at once:
    rename it to a .tmp- name first, then remove it."""
    fs = fs or FS()
    path = Path(path)
    doomed = path.with_name(f".tmp-discard-{path.name}-{os.getpid()}")
    if os.path.lexists(doomed):
        fs.rmtree(doomed)
    fs.rename(path, doomed)
    fs.fsync_dir(path.parent)
    fs.rmtree(doomed)


def _json_bytes(obj) -> bytes:
    return json.dumps(obj, indent=2, sort_keys=True).encode() + b"\n"


def _digest(chunks) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for c in chunks:
        view = memoryview(c).cast("B")
        h.update(view)
        n += view.nbytes
    return h.hexdigest(), n


def _commit(parent: Path, name: str, files: dict, meta: dict, fs: FS, check=None):
    """Write files into parent/.tmp-<name>-<pid>/, manifest last, and rename it to
    parent/<name>. A directory already named <name> is moved aside and removed after
    the rename; if the save fails before the rename it is put back.

    `files` maps names to bytes, lists of buffers or Tensors. While the files are written (no
    fsync yet), the I/O threads hash them and run `check(buffers)`; the files' fsyncs start as soon
    as they are written, beside the hashing; then the manifest, and the manifest and the folder
    fsynced together. All of it before the rename: a crash before it leaves only the temp folder,
    so the order of those fsyncs does not matter."""
    final = parent / name
    tmp = parent / f".tmp-{name}-{os.getpid()}"
    aside = parent / f".tmp-{name}-{os.getpid()}-replaced"
    for stale in (tmp, aside):
        if os.path.lexists(stale):
            fs.rmtree(stale)
    chunks = {f: _buffers(data) for f, data in files.items()}
    pool = io_pool()
    jobs = {f: pool.submit(_digest, c) for f, c in chunks.items()}
    if check is not None:
        jobs[None] = pool.submit(check, chunks)
    syncing: list = []
    moved_aside = renamed = False
    try:
        fs.mkdir(tmp)
        for f, c in chunks.items():
            fs.write_bytes(tmp / f, c, sync=False)
        # the data reaches the disk while the I/O threads still hash it
        syncing = fs.fsync_all([tmp / f for f in chunks], wait=False)
        if check is not None:
            jobs.pop(None).result()
        for done in syncing:
            done.result()
        digests = {f: d.result() for f, d in jobs.items()}
        manifest = _json_bytes(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                **meta,
                "files": {f: {"sha256": h, "bytes": n} for f, (h, n) in sorted(digests.items())},
            }
        )
        fs.write_bytes(tmp / MANIFEST, manifest, sync=False)
        fs.fsync_all([tmp / MANIFEST, tmp])
        if meta.get("kind") == "checkpoint":
            crash_point("after_temp_write", meta.get("global_step"))
        if os.path.lexists(final):
            fs.rename(final, aside)
            moved_aside = True
        fs.rename(tmp, final)
        renamed = True
        fs.fsync_dir(parent)
        if meta.get("kind") == "checkpoint":
            crash_point("after_rename", meta.get("global_step"))
    except BaseException:
        wait([*jobs.values(), *syncing])  # nothing of this save still runs once the error is raised
        # The new directory, if it made it into place, is complete; anything else goes.
        _quietly(fs.rmtree, tmp)
        if moved_aside and renamed:
            _quietly(fs.rmtree, aside)
        elif moved_aside:
            _quietly(fs.rename, aside, final)
        raise
    _quietly(fs.rmtree, aside)
    total = sum(n for _, n in digests.values()) + len(manifest)
    return final, sha256(manifest), total


def _buffers(data) -> list:
    if isinstance(data, Tensors):
        return safetensors_chunks(data.arrays)
    return [data] if isinstance(data, (bytes, bytearray, memoryview)) else data


def _quietly(op, path, *args) -> None:
    if os.path.lexists(path):
        try:
            op(path, *args)
        except OSError:
            pass


def _read_verified(path, kind: str | None = None) -> dict[str, bytes]:
    path = Path(path)
    try:
        raw = (path / MANIFEST).read_bytes()
    except FileNotFoundError:
        if not path.is_dir():
            raise CheckpointCorrupt(path, "the directory does not exist") from None
        raise CheckpointCorrupt(
            path, f"{MANIFEST} is missing: the save never completed", MANIFEST
        ) from None
    except OSError as e:
        raise CheckpointCorrupt(path, f"{MANIFEST} cannot be read: {e}", MANIFEST) from e
    try:
        manifest = json.loads(raw)
        listed = manifest["files"]
        found_kind = manifest["kind"]
        if manifest["format"] != FORMAT:
            raise ValueError(f"format is {manifest['format']!r}, not {FORMAT!r}")
        if manifest["version"] > FORMAT_VERSION:
            raise ValueError(
                f"format version {manifest['version']} is newer than this ftctl "
                f"reads ({FORMAT_VERSION})"
            )
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(path, f"{MANIFEST} is unreadable: {e}", MANIFEST) from e
    if kind is not None and found_kind != kind:
        raise CheckpointCorrupt(path, f"it holds an {found_kind}, not a {kind}", MANIFEST)
    for f in REQUIRED.get(found_kind, ()):
        if f not in listed:
            raise CheckpointCorrupt(path, f"{MANIFEST} does not list {f}", MANIFEST)
    files = {}
    for f, entry in listed.items():
        try:
            data = (path / f).read_bytes()
        except FileNotFoundError:
            raise CheckpointCorrupt(path, f"{f} is missing", f) from None
        except OSError as e:
            raise CheckpointCorrupt(path, f"{f} cannot be read: {e}", f) from e
        if len(data) != entry["bytes"]:
            raise CheckpointCorrupt(
                path, f"{f} has {len(data)} bytes, the manifest says {entry['bytes']}", f
            )
        if sha256(data) != entry["sha256"]:
            raise CheckpointCorrupt(path, f"{f} does not match its sha256 in the manifest", f)
        if f.endswith(".json"):
            try:
                json.loads(data)
            except ValueError as e:
                raise CheckpointCorrupt(path, f"{f} is unreadable JSON: {e}", f) from e
        files[f] = data
    return files
