"""`ftctl plot`: train and val loss against the global step, one colour per job, with the
checkpoints, crashes and resumes marked on the x axis in the colour of their job (matplotlib, Agg
backend: no display)."""

from __future__ import annotations

from pathlib import Path

# kind -> (matplotlib marker, size, what the legend says)
MARKS = {
    "checkpoint": ("|", 12, "checkpoint"),
    "crash": ("x", 9, "crash"),
    "resume": ("^", 8, "resume"),
}


def title(all_series, workspace: Path, lineage: str | None) -> tuple[str, str]:
    """(title, subtitle): what is drawn — the lineage or the jobs, by name and state — and where from."""
    jobs = [f"job {s.job} {s.name} ({s.state})" for s in all_series]
    what = f"lineage {lineage}: " if lineage else ""
    head = what + (
        ", ".join(jobs) if len(jobs) <= 3 else f"{len(jobs)} jobs, {jobs[0]} … {jobs[-1]}"
    )
    stamps = [p["ts"] for s in all_series for p in s.points]
    when = f" · last point {max(stamps)[:16].replace('T', ' ')} UTC" if stamps else ""
    return "loss · " + head, f"workspace {workspace}{when}"


def draw(all_series, out: Path, heading: tuple[str, str]) -> int:
    """Draw the series that have points; returns how many points were drawn (the caller refuses an
    empty plot before calling)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.lines import Line2D

    fig, ax = plt.subplots(figsize=(11, 5.8), dpi=110)
    n = 0
    colours = {}
    for i, s in enumerate(all_series):
        colour = colours[s.job] = f"C{i % 10}"
        train = [(p["global_step"], p["loss"]) for p in s.points if p["loss"] is not None]
        val = [(p["global_step"], p["val_loss"]) for p in s.points if p["val_loss"] is not None]
        if train:
            ax.plot(*zip(*train), color=colour, lw=1.4, label=f"job {s.job} ({s.name}): train")
        if val:
            # Dots, not a line: evaluations are every steps_per_eval steps (the first one before
            # training), and a straight segment between two of them is no measured curve.
            ax.plot(
                *zip(*val),
                color=colour,
                ls="none",
                marker="o",
                ms=5.5,
                mec="white",
                mew=0.6,
                label=f"job {s.job} ({s.name}): val",
            )
        n += len(train) + len(val)
    ax.set_xlabel("global step (continues across warm-started jobs of a lineage)")
    ax.set_ylabel("loss")
    ymin, ymax = ax.get_ylim()
    kinds = set()
    for s in all_series:
        for m in s.markers:
            if m.kind not in MARKS:
                continue
            sym, size, _ = MARKS[m.kind]
            kinds.add(m.kind)
            ax.plot(
                [m.global_step],
                [ymin],
                marker=sym,
                color=colours[s.job],
                mew=2 if m.kind == "crash" else 1.2,
                ms=size,
                ls="none",
                clip_on=False,
                zorder=5,
            )
    ax.set_ylim(ymin, ymax)
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    # the marker kinds in black: their colour is their job's
    handles += [
        Line2D(
            [],
            [],
            color="#333333",
            marker=MARKS[k][0],
            ls="none",
            ms=MARKS[k][1] * 0.8,
            label=MARKS[k][2] + " (job's colour)",
        )
        for k in MARKS
        if k in kinds
    ]
    ax.legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle(heading[0], fontsize=10.5, x=0.01, ha="left")
    ax.set_title(heading[1], fontsize=8, loc="left", color="#666666")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return n
