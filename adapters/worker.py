"""The training worker: ``python -m ftctl.adapters.worker --message-fd N``.

Protocol with the daemon (its parent and only supervisor):
* stdin, first line: the TrainPlan. Later lines: ``Stop`` (checkpoint now and exit). Every
  message, both ways, is a type of adapters/protocol.py.
  EOF on stdin means the daemon is gone: the worker exits at once (the portable twin of
  PR_SET_PDEATHSIG), so a worker never outlives its supervisor.
* fd N: one message per line (see trainer.run), ending with ``Failed`` on failure.
* stdout/stderr go to logs/job-<id>.log; the daemon keeps the tail as crash evidence.
A Python exception before the ``Loaded`` message is a ``load_error`` (the model, data or config:
a retry cannot fix it), after it an ``exception``.
Exit codes: 0 done or stopped, 3 diverged (nan/inf), 4 disk full, 5 corrupt checkpoint,
6 import error, 7 I/O error, 1 any other exception.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import threading
import traceback

from ftctl.adapters import faults
from ftctl.adapters import protocol as P  # light: msgspec and the config schema only


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--message-fd", type=int, required=True)
    ap.add_argument("--job", default="")        # for `ps` and `ftctl doctor` only
    ap.add_argument("--workspace", default="")
    args = ap.parse_args()
    out = os.fdopen(args.message_fd, "wb", buffering=0)
    lock = threading.Lock()

    loaded = threading.Event()  # before it is set, a failure is in loading: a retry would fail the same way

    def emit(msg) -> None:
        with lock:
            out.write(P.encode(msg) + b"\n")
        if isinstance(msg, P.Loaded):
            loaded.set()

    plan_line = sys.stdin.buffer.readline()
    stop = threading.Event()
    faults.wake_when(stop.is_set)  # an FTCTL_HANG_AT point stands still until the daemon says `stop`

    def control() -> None:
        for line in sys.stdin.buffer:
            try:
                P.decode_control(line.strip())
            except P.ProtocolError as e:  # the daemon is ours: this is a bug, but never a reason to die
                print(f"ignored: {e}", file=sys.stderr, flush=True)
                continue
            stop.set()
        os._exit(70)  # EOF: the daemon died; never train unsupervised

    threading.Thread(target=control, daemon=True, name="control").start()

    def fail(code: int, category: str, e: BaseException, **extra) -> int:
        emit(P.Failed(category=category, message=str(e) if category in ("nan", "inf", "corrupt_checkpoint")
                      else f"{type(e).__name__}: {e}", **extra))
        return code

    try:
        from ftctl.adapters.checkpoint import CheckpointCorrupt
        from ftctl.adapters.faults import fs_from_env
        from ftctl.adapters.trainer import TrainingDiverged, run
    except ImportError as e:
        traceback.print_exc()
        return fail(6, "import_error", e)

    try:
        plan = P.decode_plan(plan_line)
        print(f"worker pid {os.getpid()}: job {plan.job_id}, resume_from={plan.resume_from}, "
              f"warm_start_from={plan.warm_start_from}", flush=True)
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
    except Exception as e:
        traceback.print_exc()
        return fail(1, "exception" if loaded.is_set() else "load_error", e)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the control thread may still block on stdin
