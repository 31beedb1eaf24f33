"""The training worker: ``python -m ftctl.adapters.worker --message-fd N``.

Protocol with the daemon (its parent and only supervisor):
* stdin, first line: the TrainPlan. Later lines: ``Stop`` (checkpoint now and exit). Every
  message, both ways, is a type of adapters/protocol.py.
  EOF on stdin means the daemon is gone: the worker exits at once (the portable twin of
  PR_SET_PDEATHSIG), so a worker never outlives its supervisor.
* fd N: one message per line (see trainer.run), ending with ``Failed`` on failure.
* stdout/stderr go to logs/job-<id>.log; the daemon keeps the tail as crash evidence.
The worker imports what training needs (MLX, mlx-lm, transformers, the trainer) *before* it reads
the plan, so a standby worker (control/standby.py: started with no plan, its output in
logs/standby.log, or nowhere for `ftctl lora`'s spare started before its workspace) is ready and
waits, training nothing, until the daemon writes a plan to its stdin; it then moves its
stdout/stderr to the plan's ``log_path`` (the job log) and trains. EOF before a plan: the daemon is
gone or dismissed it, exit 70. An import error is reported only once the plan is there, in the job
log, like any failure.
A Python exception before the ``Loaded`` message is a ``load_error`` (the model, data or config:
a retry cannot fix it), after it an ``exception``.
A rank of a data-parallel job (``--connect``, started by mlx.launch, see adapters/group.py) talks
the same protocol over one TCP connection to the daemon (FTCTL_CONTROLLER=host:port): it sends
``Hello`` (with FTCTL_GROUP_TOKEN), then reads the plan and ``Stop`` from the connection and writes
its messages to it. Its output goes wherever mlx.launch sends it (the job log). EOF on the
connection means the daemon is gone or tore the group down: the rank exits at once, wherever it is,
even on another host.
Exit codes: 0 done or stopped, 3 diverged (nan/inf), 4 disk full, 5 corrupt checkpoint,
6 import error, 7 I/O error, 1 any other exception.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import socket
import sys
import threading
import time
import traceback

from ftctl.adapters import faults, system, transformers_index
from ftctl.adapters import protocol as P  # light: msgspec and the config schema only
from ftctl.core.config import RecordedConfigError  # light: the config schema (protocol imports it)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--message-fd", type=int)
    ap.add_argument(
        "--connect", action="store_true", help="a rank of a data-parallel job (see the docstring)"
    )
    ap.add_argument("--job", default="")  # for `ps` and `ftctl doctor` only
    ap.add_argument("--workspace", default="")
    args = ap.parse_args()
    if args.connect:
        inp, out = _connect()
    else:
        inp, out = sys.stdin.buffer, os.fdopen(args.message_fd, "wb", buffering=0)
    lock = threading.Lock()

    # before it is set, a failure is in loading: a retry would fail the same way
    loaded = threading.Event()

    def emit(msg) -> None:
        with lock:
            out.write(P.encode(msg) + b"\n")
        if isinstance(msg, P.Loaded):
            loaded.set()

    imported: ImportError | None = None
    t0 = time.monotonic()
    transformers_index.install(system.cache_dir())  # half of mlx-lm's import time, read back
    try:  # first, so that a standby worker is warm before its job is known
        from ftctl.adapters.checkpoint import CheckpointCorrupt
        from ftctl.adapters.faults import fs_from_env
        from ftctl.adapters.trainer import TrainingDiverged, run

        _prewarm()
    except ImportError as e:
        imported = e

    # no plan waiting: this is a standby (its own log)
    if not args.connect and not select.select([0], [], [], 0)[0]:
        print(
            f"worker pid {os.getpid()}: standby, imports done in {time.monotonic() - t0:.2f} s; "
            "waiting for a plan",
            flush=True,
        )
    plan_line = inp.readline()
    if not plan_line:
        os._exit(70)  # EOF before any plan: the daemon is gone (or dismissed this standby)
    try:
        plan = P.decode_plan(plan_line)
    except Exception:
        plan = None  # reported below, as an exception before loading
    if plan is not None and plan.log_path and not args.connect:
        _output_to(plan.log_path)
    stop = threading.Event()
    # an FTCTL_HANG_AT point stands still until the daemon says `stop`
    faults.wake_when(stop.is_set)

    def control() -> None:
        for line in inp:
            try:
                P.decode_control(line.strip())
            except (
                P.ProtocolError
            ) as e:  # the daemon is ours: this is a bug, but never a reason to die
                print(f"ignored: {e}", file=sys.stderr, flush=True)
                continue
            stop.set()
        os._exit(70)  # EOF: the daemon died; never train unsupervised

    threading.Thread(target=control, daemon=True, name="control").start()

    def fail(code: int, category: str, e: BaseException, **extra) -> int:
        emit(
            P.Failed(
                category=category,
                message=str(e)
                if category in ("nan", "inf", "corrupt_checkpoint")
                else f"{type(e).__name__}: {e}",
                **extra,
            )
        )
        return code

    if imported is not None:
        traceback.print_exception(imported)
        return fail(6, "import_error", imported)

    try:
        plan = P.decode_plan(plan_line)
        print(
            f"worker pid {os.getpid()}: job {plan.job_id}, resume_from={plan.resume_from}, "
            f"warm_start_from={plan.warm_start_from}",
            flush=True,
        )
        run(plan, emit, stop.is_set, fs=fs_from_env())
        return 0
    except TrainingDiverged as e:
        print(str(e), file=sys.stderr, flush=True)
        return fail(3, e.category, e, step=e.step)
    except CheckpointCorrupt as e:
        print(str(e), file=sys.stderr, flush=True)
        return fail(5, "corrupt_checkpoint", e, path=e.path)
    except OSError as e:
        traceback.print_exc()
        if e.errno == errno.ENOSPC:
            return fail(4, "disk_full", e)
        if e.errno == errno.EIO:
            return fail(7, "io_error", e)
        return fail(1, "exception" if loaded.is_set() else "load_error", e)
    except ImportError as e:
        traceback.print_exc()
        return fail(6, "import_error", e)
    except (
        RecordedConfigError
    ) as e:  # the job's recorded config cannot run: say which override would
        traceback.print_exc()
        return fail(1, "exception" if loaded.is_set() else "load_error", e, fix=e.fix)
    except Exception as e:
        traceback.print_exc()
        return fail(1, "exception" if loaded.is_set() else "load_error", e)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


class _Sent:
    """Writes whole lines to the daemon's connection (sendall: never a partial message)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


def _connect():
    """A rank's line to the daemon: connect, say who it is, die with its parent (the launcher)."""
    host, _, port = os.environ.get("FTCTL_CONTROLLER", "").rpartition(":")
    try:
        sock = socket.create_connection((host, int(port)), timeout=30)
    except (OSError, ValueError) as e:
        print(
            f"cannot reach the ftctl daemon at {host}:{port} (FTCTL_CONTROLLER): {e}",
            file=sys.stderr,
            flush=True,
        )
        os._exit(70)
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # also dies with mlx.launch, not only on the connection's EOF
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    rank = int(
        os.environ.get("MLX_RANK")
        or os.environ.get("OMPI_COMM_WORLD_RANK")
        or os.environ.get("PMI_RANK")
        or 0
    )
    out = _Sent(sock)
    out.write(
        P.encode(
            P.Hello(
                token=os.environ.get("FTCTL_GROUP_TOKEN", ""),
                rank=rank,
                pid=os.getpid(),
                host=socket.gethostname(),
            )
        )
        + b"\n"
    )
    return sock.makefile("rb"), out


def _prewarm() -> None:
    """What loading a model imports lazily, imported now (a standby pays it before its job)."""
    try:
        import transformers

        transformers.AutoTokenizer, transformers.PreTrainedTokenizerFast  # noqa: B018 (lazy modules)
        import mlx_lm.tokenizer_utils  # noqa: F401
    except Exception:  # never a reason to fail: loading will import (and report) it properly
        pass


def _output_to(path: str) -> None:
    """Point fds 1 and 2 (Python's and native code's output) at the end of ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the control thread may still block on stdin
