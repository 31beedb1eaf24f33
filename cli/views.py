"""Commands that show the training: metrics, compare, plot, export-tb, serve. Each parses, calls the
control layer (control/metrics.py, control/tensorboard.py), renders (cli/table.py names them)."""

from __future__ import annotations

import csv
import ipaddress
import sys
from pathlib import Path

from ftctl.control.ledger import Ledger
from ftctl.control.reporter import memory
from ftctl.events.errors import UserError

from . import render
from .args import port

SERVE_EXTRA = "pip install 'ftctl[serve]'"
PLOT_EXTRA = "pip install 'ftctl[plot]'"


def _read_ledger(ws) -> Ledger:
    return Ledger(render.said_readonly(ws.open_journal(write=False)), write_snapshots=False)


def _csv_cell(v) -> object:
    """None is an empty cell; a list (per-rank tokens/s) is "r0;r1;..." with an empty entry for None."""
    if v is None:
        return ""
    if isinstance(v, list):
        return ";".join("" if t is None else f"{t:.1f}" for t in v)
    return v


def _pairs(p: dict) -> str:
    """A preference-training point's figures (dpo, orpo): accuracy and reward margin of the training
    window, and of the validation pairs; '' for sft."""
    out = ""
    for label, acc, margin in (
        ("", p["accuracy"], p["reward_margin"]),
        ("val ", p["val_accuracy"], p["val_reward_margin"]),
    ):
        if acc is not None or margin is not None:
            a = "-" if acc is None else format(acc, ".2f")
            m = "-" if margin is None else format(margin, ".4f")
            out += f"  {label}acc {a} margin {m}"
    return out


def add_metrics(p) -> None:
    p.add_argument("job", nargs="*", help="job ids (7 or 0007)")
    p.add_argument("--lineage", metavar="NAME", help="every job of the lineage instead")
    p.add_argument("--since", type=int, metavar="STEP", help="only points after global step STEP")
    p.add_argument(
        "--all",
        action="store_true",
        help="also the points a resume superseded (reported after the last checkpoint by a crashed attempt)",
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with a header line")
    fmt.add_argument(
        "--json", action="store_true", help="JSON: the jobs (counts, markers) and the points"
    )


def cmd_metrics(args, ws) -> int:
    from ftctl.control import metrics

    ledger = _read_ledger(ws)
    all_series = metrics.lineage_series(
        ledger, args.job, args.lineage, since=args.since, superseded=args.all
    )
    points = [p for s in all_series for p in s.points]
    cols = [c for c in metrics.COLUMNS if c != "superseded" or args.all]
    if args.json:  # msgspec, not json: 100k points
        import msgspec

        body = {
            "jobs": [
                {
                    "job": s.job,
                    "name": s.name,
                    "lineage": s.lineage,
                    "state": s.state,
                    "iters": s.iters,
                    "global_step_base": s.global_step_base,
                    "counts": s.counts,
                    "markers": [m.__dict__ for m in s.markers],
                }
                for s in all_series
            ],
            "points": [{c: p[c] for c in cols} for p in points],
        }
        sys.stdout.write(msgspec.json.format(msgspec.json.encode(body), indent=2).decode() + "\n")
        return 0
    if args.csv:
        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows([[_csv_cell(p[c]) for c in cols] for p in points])
        return 0
    if not points:
        render.console.print(
            "no metrics recorded"
            + (f" after global step {args.since}" if args.since is not None else "")
            + ": a job reports every `steps_per_report` steps once it trains"
        )
        return 0
    # Plain lines, not a rich table: a long run has 100k points and this must print them in a blink.
    head = (
        f"{'job':<6} {'att':>3} {'global':>8} {'step':>7} {'loss':>9} {'val_loss':>9} {'lr':>9} "
        f"{'tok/s':>8} {'peak mem':>8}  time (UTC)"
    )
    out = [head]
    add = out.append
    for p in points:  # one f-string a line, no call per field: 100k lines in a fraction of a second
        loss, val, lr, tps, mem = (
            p["loss"],
            p["val_loss"],
            p["lr"],
            p["tokens_per_s"],
            p["peak_mem_gb"],
        )
        add(
            f"{p['job']:<6} {p['attempt']:>3} {p['global_step']:>8} {p['step']:>7} "
            f"{'-' if loss is None else format(loss, '.4f'):>9} {'-' if val is None else format(val, '.4f'):>9} "
            f"{'-' if lr is None else format(lr, '.3g'):>9} {'-' if tps is None else format(tps, '.0f'):>8} "
            f"{memory(mem):>8}  {p['ts'][:10]} {p['ts'][11:19]}"
            + (
                f"  ranks {'/'.join('-' if t is None else format(t, '.0f') for t in p['rank_tokens_per_s'])} tok/s"
                if p["rank_tokens_per_s"]
                else ""
            )
            + _pairs(p)
            + ("  superseded (rewound by a resume)" if p["superseded"] else "")
        )
    sys.stdout.write("\n".join(out) + "\n")
    hidden = sum(s.counts["superseded"] for s in all_series) if args.all else 0
    sys.stderr.write(
        (
            f"{hidden} point(s) superseded: reported after the last checkpoint by an attempt that crashed, "
            "then trained again from that checkpoint\n"
        )
        if hidden
        else ""
    )
    return 0


def add_compare(p) -> None:
    p.add_argument("job", nargs="*", help="job ids (7 or 0007)")
    p.add_argument("--lineage", metavar="NAME", help="every job of the lineage instead")
    p.add_argument("--last", type=int, metavar="N", help="the N jobs submitted last instead")
    p.add_argument(
        "--all", action="store_true", help="every config key, not only those that differ"
    )
    p.add_argument(
        "--sort",
        metavar="COL",
        help="sort the rows by this column (any column shown; jobs without a value last)",
    )
    p.add_argument("--reverse", action="store_true", help="largest first (with --sort)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with a header line")
    fmt.add_argument(
        "--json", action="store_true", help="JSON: columns, the differing keys and the rows"
    )


def cmd_compare(args, ws) -> int:
    from ftctl.control import compare

    c = compare.compare(
        _read_ledger(ws),
        args.job,
        args.lineage,
        args.last,
        all_keys=args.all,
        sort=args.sort,
        reverse=args.reverse,
    )
    if args.json:
        render.print_json(c.to_builtins())
    elif args.csv:
        from ftctl.core.compare import cell

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(c.columns)
        w.writerows(
            [
                [cell(r[k]) if not isinstance(r[k], float) else r[k] for k in c.columns]
                for r in c.rows
            ]
        )
    else:
        render.console.print(
            render.compare_table(c, render.console.width), crop=False, soft_wrap=True
        )
    return 0


def add_plot(p) -> None:
    p.add_argument("job", nargs="*", help="job ids (7 or 0007)")
    p.add_argument("--lineage", metavar="NAME", help="every job of the lineage instead")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="FILE.png or FILE.svg")
    p.add_argument("--json", action="store_true", help="print what was drawn as JSON")


def cmd_plot(args, ws) -> int:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError(f"`ftctl plot` needs matplotlib: {PLOT_EXTRA}") from None
    out = Path(args.output)
    if out.suffix.lower() not in (".png", ".svg"):
        raise UserError(f"-o {args.output}: the file must end in .png or .svg")
    if not out.parent.is_dir():
        raise UserError(f"-o {args.output}: the folder {out.parent} does not exist")
    from ftctl.control import metrics

    ledger = _read_ledger(ws)
    all_series = metrics.lineage_series(ledger, args.job, args.lineage)
    drawn = [s for s in all_series if s.counts["train"] or s.counts["val"]]
    empty = [s for s in all_series if s not in drawn]
    if not drawn:
        which = ", ".join(f"{s.job} ({s.state})" for s in empty)
        raise UserError(
            f"nothing to plot: no loss was recorded yet for job {which}",
            kept="no file was written",
            do="plot it once it trains: a job reports every `steps_per_report` steps and evaluates "
            "every `steps_per_eval`",
        )
    from .plot import draw, title

    n = draw(drawn, out, title(drawn, ws.home, args.lineage))
    if args.json:
        render.print_json(
            {
                "file": str(out),
                "jobs": [s.job for s in drawn],
                "points": n,
                "no_points": [s.job for s in empty],
            }
        )
    else:
        render.console.print(
            f"wrote {out}: {n} point(s) of {len(drawn)} job(s), checkpoints, crashes and resumes "
            "marked on the x axis in each job's colour"
        )
        for s in empty:
            render.console.print(f"job {s.job} ({s.state}) has no loss recorded yet: not drawn")
    return 0


def add_export_tb(p) -> None:
    p.add_argument("job", nargs="*", help="job ids (default: every job)")
    p.add_argument("--lineage", metavar="NAME", help="every job of the lineage")
    p.add_argument("-o", "--output", metavar="DIR", help="the log folder (default: WS/tensorboard)")
    p.add_argument("--json", action="store_true", help="print the folders written as JSON")


def cmd_export_tb(args, ws) -> int:
    from ftctl.control.tensorboard import export

    ledger = _read_ledger(ws)
    done = export(ws, ledger, args.job, args.lineage, Path(args.output) if args.output else None)
    if args.json:
        render.print_json([e.__dict__ for e in done])
        return 0
    for e in done:
        render.console.print(f"job {e.job}: {e.points} point(s) -> {render.escape(e.folder)}")
    logdir = Path(args.output) if args.output else ws.tensorboard
    render.console.print(f"view them with `tensorboard --logdir {logdir}`")
    return 0


def check_bind(host: str, token: str | None) -> None:
    """127.0.0.1 (or another loopback address) by default; any other address only with a token."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        raise UserError(
            f"--host {host!r} is not an IP address (give one, e.g. 127.0.0.1 or 0.0.0.0)"
        ) from None
    if not loopback and not token:
        raise UserError(
            f"refusing to serve on {host}, which other machines can reach, without a token: "
            "add --token TOKEN (every request must then carry it), or leave --host out for 127.0.0.1"
        )


def serve_app(ws, token: str | None, host: str = "127.0.0.1"):
    try:
        from .web.app import make_app
    except ImportError as e:
        raise UserError(
            f"`ftctl serve` needs Starlette and uvicorn ({e.name} is missing): {SERVE_EXTRA}"
        ) from None
    return make_app(ws, token=token, host=host)


def add_serve(p) -> None:
    p.add_argument(
        "--port", type=port, default=8765, help="TCP port (default 8765; 0: any free port)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="ADDR",
        help="address to bind (default 127.0.0.1; any other needs --token)",
    )
    p.add_argument(
        "--token",
        metavar="TOKEN",
        help="every request must carry it (?token= or Authorization: Bearer)",
    )


def cmd_serve(args, ws) -> int:
    check_bind(args.host, args.token)
    ws.require()
    app = serve_app(ws, args.token, args.host)
    from .web.app import bind, run, url

    sock = bind(args.host, args.port)
    with render.said_readonly(ws.open_journal(write=False)):
        pass  # the page reads it read-only anyway: only the note, if the storage refuses writes
    render.err_console.print(
        f"serving {ws.home} read-only at {url(args.host, sock.getsockname()[1])}"
        + ("?token=…" if args.token else "")
        + "  (Ctrl-C stops it)"
    )
    run(app, sock)
    return 0
