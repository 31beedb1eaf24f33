"""`ftctl plot`: train and val loss against the global step, one colour per job, with the
checkpoints, crashes and resumes marked on the x axis in the colour of their job; below, where the
points have them, preference training's rewards and margin, its accuracy, and the memory (matplotlib,
Agg backend: no display)."""

from __future__ import annotations

from pathlib import Path

XLABEL = "global step (continues across warm-started jobs of a lineage)"
# kind -> (matplotlib marker, size, what the legend says)
MARKS = {
    "checkpoint": ("|", 12, "checkpoint"),
    "crash": ("x", 9, "crash"),
    "resume": ("^", 8, "resume"),
    "alert": ("*", 11, "training-health alert"),
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

    # the panels below the loss's, each where some point has its figures
    below = [draw for draw, shown in _PANELS if shown(all_series)]
    if below:
        fig, (ax, *axes) = plt.subplots(
            1 + len(below),
            1,
            figsize=(11, 5.8 + 2.6 * len(below)),
            dpi=110,
            sharex=True,
            gridspec_kw={"height_ratios": [2.2] + [1] * len(below)},
        )
    else:
        fig, ax = plt.subplots(figsize=(11, 5.8), dpi=110)
        axes = []
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
    if not below:  # else the lowest panel carries the axis label
        ax.set_xlabel(XLABEL)
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
    for draw_panel, panel_ax in zip(below, axes):
        draw_panel(panel_ax, all_series, colours)
    if axes:
        axes[-1].set_xlabel(XLABEL)
    fig.suptitle(heading[0], fontsize=10.5, x=0.01, ha="left")
    ax.set_title(heading[1], fontsize=8, loc="left", color="#666666")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return n


# the memory panel: each job's worker RSS (solid), MLX's active + cache (dashed), the GPU's memory in use
# (dotted), and the GPU's temperature on the right axis, where the reports have them (docs/hardware.md)
_MEMORY = (
    ("rss_gb", "-", "worker RSS"),
    ("mlx_gb", "--", "MLX active + cache"),
    ("device_mem_used_gb", ":", "GPU memory used"),
)


def _value(p: dict, key: str):
    if key == "mlx_gb":
        a = p.get("mem_active_gb")
        return None if a is None else a + (p.get("mem_cache_gb") or 0.0)
    return p.get(key)


def _memory_panel(all_series) -> bool:
    return any(
        _value(p, k) is not None or p.get("device_temp_c") is not None
        for s in all_series
        for p in s.points
        for k, _, _ in _MEMORY
    )


def _draw_memory(ax, all_series, colours) -> None:
    temp_ax = None
    for s in all_series:
        for key, style, label in _MEMORY:
            pts = [(p["global_step"], v) for p in s.points if (v := _value(p, key)) is not None]
            if pts:
                ax.plot(
                    *zip(*pts),
                    ls=style,
                    lw=1.2,
                    color=colours[s.job],
                    label=f"job {s.job}: {label}",
                )
        temps = [
            (p["global_step"], p["device_temp_c"])
            for p in s.points
            if p.get("device_temp_c") is not None
        ]
        if temps:
            temp_ax = temp_ax or ax.twinx()
            temp_ax.plot(
                *zip(*temps),
                color=colours[s.job],
                lw=0.9,
                alpha=0.6,
                marker=".",
                ms=3,
                label=f"job {s.job}: GPU °C",
            )
    ax.set_ylabel("memory (GB)")
    ax.grid(alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if temp_ax is not None:
        temp_ax.set_ylabel("GPU temperature (°C)")
        handles += temp_ax.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="upper left")


# preference training (train_mode dpo, orpo): each report's window (lines) and the validation pairs
# (dots, as val loss is drawn), in the job's colour; the figure by its line style
_REWARDS = (
    ("chosen_reward", "-", "chosen reward"),
    ("rejected_reward", ":", "rejected reward"),
    ("reward_margin", "--", "reward margin"),
)
_ACCURACY = (("accuracy", "-", "accuracy"),)
_DOTS = {"-": "o", ":": "v", "--": "D"}


def _has(all_series, figures) -> bool:
    return any(
        p.get(k) is not None or p.get("val_" + k) is not None
        for s in all_series
        for p in s.points
        for k, _, _ in figures
    )


def _draw_pairs(ax, all_series, colours, figures, ylabel: str) -> None:
    for s in all_series:
        for key, style, label in figures:
            train = [(p["global_step"], p[key]) for p in s.points if p.get(key) is not None]
            val = [
                (p["global_step"], v) for p in s.points if (v := p.get("val_" + key)) is not None
            ]
            if train:
                ax.plot(
                    *zip(*train),
                    ls=style,
                    lw=1.2,
                    color=colours[s.job],
                    label=f"job {s.job}: {label}",
                )
            if val:
                ax.plot(
                    *zip(*val),
                    ls="none",
                    marker=_DOTS[style],
                    ms=5,
                    mec="white",
                    mew=0.6,
                    color=colours[s.job],
                    label=f"job {s.job}: val {label}",
                )
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")


def _draw_rewards(ax, all_series, colours) -> None:
    _draw_pairs(ax, all_series, colours, _REWARDS, "reward")
    ax.axhline(0, color="#999999", lw=0.8)


def _draw_accuracy(ax, all_series, colours) -> None:
    _draw_pairs(ax, all_series, colours, _ACCURACY, "pairs ranked right")
    ax.set_ylim(-0.03, 1.03)


# the panels below the loss's, top to bottom: (draw(ax, series, colours), whether any point has it)
_PANELS = (
    (_draw_rewards, lambda all_series: _has(all_series, _REWARDS)),
    (_draw_accuracy, lambda all_series: _has(all_series, _ACCURACY)),
    (_draw_memory, _memory_panel),
)
