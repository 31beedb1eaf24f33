"""The training worker: ``python -m ftctl.adapters.worker --message-fd N``.

Protocol with the daemon (its parent and only supervisor):
* stdin, first line: the TrainPlan as JSON. Later lines: ``stop`` (checkpoint now and exit).
  EOF on stdin means the daemon is gone: the worker exits at once (the portable twin of
  PR_SET_PDEATHSIG), so a worker never outlives its supervisor.
* fd N: one JSON message per line (see trainer.run), ending with ``error`` on failure.
* stdout/stderr go to logs/job-<id>.log; the daemon keeps the tail as crash evidence.
Exit codes: 0 done or stopped, 3 diverged (nan/inf), 4 disk full, 5 corrupt checkpoint,
6 import error, 7 I/O error, 1 any other exception.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import sys
import threading
import traceback

from ftctl.adapters import faults


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--message-fd", type=int, required=True)
    ap.add_argument("--job", default="")        # for `ps` and `ftctl doctor` only
    ap.add_argument("--workspace", default="")
    args = ap.parse_args()
    out = os.fdopen(args.message_fd, "w", buffering=1)
    lock = threading.Lock()

    def emit(msg: dict) -> None:
        with lock:
            out.write(json.dumps(msg, separators=(",", ":")) + "\n")

    plan_line = sys.stdin.buffer.readline()
    stop = threading.Event()
    faults.wake_when(stop.is_set)  # an FTCTL_HANG_AT point stands still until the daemon says `stop`

    def control() -> None:
        for line in sys.stdin:
            if line.strip() == "stop":
                stop.set()
        os._exit(70)  # EOF: the daemon died; never train unsupervised

    threading.Thread(target=control, daemon=True, name="control").start()

    try:
        import msgspec

        from ftctl.adapters.checkpoint import CheckpointCorrupt
        from ftctl.adapters.faults import fs_from_env
        from ftctl.adapters.trainer import TrainingDiverged, TrainPlan, run
    except ImportError as e:
        emit({"t": "error", "category": "import_error", "message": f"{type(e).__name__}: {e}"})
        traceback.print_exc()
        return 6

    try:
        plan = msgspec.json.decode(plan_line, type=TrainPlan)
        print(f"worker pid {os.getpid()}: job {plan.job_id}, resume_from={plan.resume_from}, "
              f"warm_start_from={plan.warm_start_from}", flush=True)
        run(plan, emit, stop.is_set, fs=fs_from_env())
        return 0
    except TrainingDiverged as e:
        emit({"t": "error", "category": e.category, "step": e.step, "message": str(e)})
        print(str(e), file=sys.stderr, flush=True)
        return 3
    except CheckpointCorrupt as e:
        emit({"t": "error", "category": "corrupt_checkpoint", "path": str(e.path), "message": str(e)})
        print(str(e), file=sys.stderr, flush=True)
        return 5
    except OSError as e:
        traceback.print_exc()
        if e.errno == errno.ENOSPC:
            emit({"t": "error", "category": "disk_full", "message": str(e)})
            return 4
        if e.errno == errno.EIO:
            emit({"t": "error", "category": "io_error", "message": str(e)})
            return 7
        emit({"t": "error", "category": "exception", "message": f"{type(e).__name__}: {e}"})
        return 1
    except ImportError as e:
        traceback.print_exc()
        emit({"t": "error", "category": "import_error", "message": f"{type(e).__name__}: {e}"})
        return 6
    except Exception as e:
        traceback.print_exc()
        emit({"t": "error", "category": "exception", "message": f"{type(e).__name__}: {e}"})
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # skip interpreter teardown: the control thread may still block on stdin
