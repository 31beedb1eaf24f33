"""TensorBoard event files, written with tensorboardX (the `ftctl[tensorboard]` extra).

One run folder per job; each attempt opens its own event file. A resumed attempt opens it with
``purge_step`` = the resume point's global step + 1: that writes TensorBoard's "restarted here"
marker (a SessionLog START at that step), and TensorBoard then drops every point at or past it
that was written before it — exactly the points the crashed attempt reported after its last
committed checkpoint. The curves never show a step twice or out of order.
"""

from __future__ import annotations

from pathlib import Path

EXTRA = "pip install 'ftctl[tensorboard]'"
TAGS = {
    "loss": "loss/train",
    "val_loss": "loss/val",
    "lr": "lr",
    "tokens_per_s": "tokens_per_s",
    "peak_mem_gb": "peak_mem_gb",
    # preference training (train_mode dpo, orpo): the report window's and the validation pairs'
    "accuracy": "preference/accuracy/train",
    "val_accuracy": "preference/accuracy/val",
    "reward_margin": "preference/reward_margin/train",
    "val_reward_margin": "preference/reward_margin/val",
    "chosen_reward": "preference/chosen_reward",
    "rejected_reward": "preference/rejected_reward",
}


class Missing(Exception):
    """tensorboardX is not installed; str() says how to get it."""


def available() -> bool:
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


class Run:
    """One job's event file for one attempt."""

    def __init__(
        self, folder: Path, *, attempt: int, purge_step: int | None = None, flush_secs: int = 5
    ):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise Missing(f"writing TensorBoard files needs tensorboardX: {EXTRA}") from None
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.writer = SummaryWriter(
            logdir=str(folder),
            purge_step=purge_step,
            flush_secs=flush_secs,
            filename_suffix=f".attempt{attempt}",
        )

    def point(self, global_step: int, values: dict, walltime: float | None = None) -> None:
        for key, tag in TAGS.items():
            v = values.get(key)
            if v is not None:
                self.writer.add_scalar(tag, v, global_step, walltime=walltime)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def event_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
