"""`report_to`: training also logged to mlx-lm's trackers (wandb, swanlab), offline / local.

Like the live TensorBoard files (tensorboard.py), the daemon feeds them each point *after* the journal
has recorded it, never from the worker's path, with mlx-lm's own names (train_loss, learning_rate,
tokens_per_second, trained_tokens, peak_memory; val_loss), and preference training's figures
(chosen_reward, rejected_reward, reward_margin, accuracy; val_… of the validation pairs), on the job's
global step. No account and no network: wandb runs with mode="offline" (files under
WS/trackers/<job>/wandb, `wandb sync` later if you want them online), swanlab with mode="local". One
tracker run per attempt (a resumed attempt goes back to its checkpoint's step, which a tracker's run
cannot). Submit refused a tracker whose
package is missing; a failure here is said once and turns that tracker off for the attempt.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from ftctl.adapters.workspace import Workspace
from ftctl.core.config import config_to_dict
from ftctl.core.state import JobState
from ftctl.events.types import PAIR_FIELDS, Metrics, PairStats

from .metrics import val_pairs


class Trackers:
    """The running attempt's tracker runs (one per supervised attempt)."""

    def __init__(self, ws: Workspace, j: JobState, say: Callable[[str, str], None]):
        self.say, self.job, self.runs = say, j.job, {}
        cfg = j.config
        if cfg is None or not cfg.report_to:
            return
        folder = ws.home / "trackers" / j.job
        name = f"{j.job}-{j.name}-attempt{j.attempt}"
        for tracker in (x.strip().lower() for x in cfg.report_to.split(",") if x.strip()):
            try:
                folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                mod = importlib.import_module(tracker)
                settings = dict(project=cfg.project_name, config=config_to_dict(cfg))
                if tracker == "wandb":
                    run = mod.init(
                        name=name, dir=str(folder), mode="offline", reinit=True, **settings
                    )
                else:
                    run = mod.init(
                        experiment_name=name,
                        logdir=str(folder / "swanlog"),
                        mode="local",
                        **settings,
                    )
                self.runs[tracker] = (mod, run)
            except Exception as e:  # noqa: BLE001 - a tracker is a view: it may fail, training may not
                self._off(tracker, e)
        if self.runs:
            say(f"job {j.job}: logging to {', '.join(self.runs)} (offline, in {folder})")

    def _off(self, tracker: str, e: Exception) -> None:
        self.say(
            f"job {self.job}: {tracker} is not logged for this attempt: {type(e).__name__}: {e}",
            "warn",
        )
        self.runs.pop(tracker, None)

    def _log(self, data: dict, step: int) -> None:
        data = {k: v for k, v in data.items() if v is not None}
        for tracker, (mod, run) in list(self.runs.items()):
            try:
                (run.log if hasattr(run, "log") else mod.log)(data, step=step)
            except Exception as e:  # noqa: BLE001
                self._off(tracker, e)

    def report(self, m: Metrics) -> None:
        self._log(
            {
                "iteration": m.step,
                "train_loss": m.loss,
                "learning_rate": m.lr,
                "tokens_per_second": m.tokens_per_s,
                "trained_tokens": m.trained_tokens,
                "peak_memory": m.peak_mem_gb,
                **{k: getattr(m, k) for k in PAIR_FIELDS if getattr(m, k) is not None},
            },
            m.global_step,
        )

    def val(
        self, global_step: int, step: int, val_loss: float | None, pairs: PairStats | None = None
    ) -> None:
        self._log({"iteration": step, "val_loss": val_loss, **val_pairs(pairs)}, global_step)

    def close(self) -> None:
        for tracker, (mod, run) in list(self.runs.items()):
            try:
                (run.finish if hasattr(run, "finish") else mod.finish)()
            except Exception as e:  # noqa: BLE001
                self._off(tracker, e)
        self.runs = {}
