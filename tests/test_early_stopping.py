"""core.early_stopping (pure, no I/O): a job's validation losses decide the best so far and where
training stops, as Keras' EarlyStopping(mode=min) would."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st


def _keras(losses, patience, min_delta):
    """Early stopping as Keras' EarlyStopping(mode=min) does it: the index it stops at, or None."""
    ref, wait = None, 0
    for i, v in enumerate(losses):
        if v is not None and (ref is None or v < ref - min_delta):
            ref, wait = v, 0
        else:
            wait += 1
            if wait >= patience:
                return i
    return None


@given(
    st.lists(st.floats(0, 5) | st.none(), min_size=1, max_size=30),
    st.integers(1, 5),
    st.sampled_from([0.0, 0.01, 0.5]),
)
def test_early_stopping_stops_where_keras_would_and_keeps_the_best(losses, patience, min_delta):
    from ftctl.core.config import EarlyStopping
    from ftctl.core.early_stopping import ValWatch, watch

    rule, w, stop = EarlyStopping(patience=patience, min_delta=min_delta), ValWatch(), None
    for i, v in enumerate(losses):
        w, best, reason = watch(w, 10 * (i + 1), v, rule)
        finite = [x for x in losses[: i + 1] if x is not None]
        assert best == (v is not None and v == min(finite) and v not in losses[:i])
        if reason:
            stop = i
            assert reason.startswith(f"early stopping at step {10 * (i + 1)}: ")
            break
    assert stop == _keras(losses, patience, min_delta)
    seen = [x for x in losses[: (stop if stop is not None else len(losses)) + 1] if x is not None]
    assert w.best_val_loss == (min(seen) if seen else None)
