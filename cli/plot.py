"""`ftctl plot`: train and val loss against the global step, one colour per job, with the
checkpoints, crashes and resumes marked on the x axis (matplotlib, Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path

MARKS = {
    "checkpoint": ("|", "#888888", "checkpoint"),
    "crash": ("x", "#d62728", "crash"),
    "resume": ("^", "#2ca02c", "resume"),
}


def draw(all_series, out: Path, title: str = "") -> int:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.5), dpi=110)
    n, labelled = 0, set()
    lo = None
    for i, s in enumerate(all_series):
        colour = f"C{i % 10}"
        train = [(p["global_step"], p["loss"]) for p in s.points if p["loss"] is not None]
        val = [(p["global_step"], p["val_loss"]) for p in s.points if p["val_loss"] is not None]
        if train:
            ax.plot(*zip(*train), color=colour, lw=1.4, label=f"job {s.job} {s.name} train")
        if val:
            ax.plot(
                *zip(*val),
                color=colour,
                lw=1.2,
                ls="--",
                marker="o",
                ms=3,
                label=f"job {s.job} val",
            )
        n += len(train) + len(val)
        ys = [y for _, y in train + val]
        if ys:
            lo = min(ys) if lo is None else min(lo, min(ys))
    ax.set_xlabel("global step (continues across warm-started jobs of a lineage)")
    ax.set_ylabel("loss")
    ymin, ymax = ax.get_ylim()
    for s in all_series:
        for m in s.markers:
            if m.kind not in MARKS:
                continue
            sym, colour, label = MARKS[m.kind]
            ax.plot(
                [m.global_step],
                [ymin],
                marker=sym,
                color=colour,
                ms=9 if sym != "|" else 12,
                ls="none",
                clip_on=False,
                zorder=5,
                label=None if label in labelled else label,
            )
            labelled.add(label)
    ax.set_ylim(ymin, ymax)
    ax.grid(alpha=0.3)
    if all_series:
        ax.legend(fontsize=8, loc="upper right")
    ax.set_title(title or "loss", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return n
