"""What a job's validation losses decide, pure: the best so far (``result: best``) and early stopping.

The trainer (adapters/trainer.py) folds every evaluation into a ``ValWatch`` carried in each checkpoint,
so that a resumed job takes the same decisions; when ``watch`` says stop, the worker completes at that
step and the supervisor (control/supervise.py) journals ``early_stopped`` with the completion.
"""

from __future__ import annotations

import msgspec

from .config import EarlyStopping


class ValWatch(msgspec.Struct, frozen=True, kw_only=True):
    """What a job's validation losses have shown so far, carried in every checkpoint (state.json) so
    that a resumed job takes the same decisions: the best loss and its step (``result: best``), and
    early stopping's reference — the last loss that improved on the one before it by min_delta — with
    the evaluations since it."""

    best_val_loss: float | None = None
    best_step: int | None = None
    ref_val_loss: float | None = None
    ref_step: int | None = None
    stale: int = 0


def watch(
    w: ValWatch, step: int, val_loss: float | None, rule: EarlyStopping | None
) -> tuple[ValWatch, bool, str | None]:
    """Fold one evaluation of trained weights (not step 0's) into ``w``: (the new watch, whether it is
    the best so far, why training stops now — early stopping — or None). A loss that is not finite
    (None) is never an improvement. Improvement for early stopping is against the reference (Keras'
    rule): a slow steady decrease adds up until it counts."""
    best = val_loss is not None and (w.best_val_loss is None or val_loss < w.best_val_loss)
    if best:
        w = msgspec.structs.replace(w, best_val_loss=val_loss, best_step=step)
    if rule is None:
        return w, best, None
    if val_loss is not None and (
        w.ref_val_loss is None or val_loss < w.ref_val_loss - rule.min_delta
    ):
        return msgspec.structs.replace(w, ref_val_loss=val_loss, ref_step=step, stale=0), best, None
    w = msgspec.structs.replace(w, stale=w.stale + 1)
    if w.stale < rule.patience:
        return w, best, None
    since = (
        f"since step {w.ref_step} ({w.ref_val_loss:.4f})"
        if w.ref_step is not None
        else "since training began (no finite validation loss yet)"
    )
    by = f" by more than min_delta = {rule.min_delta:g}" if rule.min_delta else ""
    best_at = (
        f"; the best is {w.best_val_loss:.4f} at step {w.best_step}"
        if w.best_step is not None
        else ""
    )
    return (
        w,
        best,
        f"early stopping at step {step}: the validation loss has not improved{by} in {w.stale} "
        f"evaluations {since} (early_stopping.patience = {rule.patience}){best_at}",
    )
