"""Commands that set up: init, demo, config show, completion. Each parses, calls the control layer,
renders (cli/table.py names them)."""

from __future__ import annotations

import sys
from pathlib import Path

from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.events.errors import UserError

from . import render


def add_init(p) -> None:
    p.add_argument(
        "--model",
        help="the base model: an mlx-lm model folder, a Hugging Face repo id (from the local "
        "cache) or a Llama-family .gguf file (converted into models/imported/)",
    )
    p.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help="with a .gguf --model: dequantize to this dtype (default: keep the file's quantization, QLoRA)",
    )
    p.add_argument(
        "--demo", action="store_true", help="build the embedded tiny demo model and data, offline"
    )
    p.add_argument("--json", action="store_true", help="print what was created as JSON")


def cmd_init(args, ws: Workspace) -> int:
    data = None
    if args.demo:
        from ftctl.control.demo import init_demo

        paths = init_demo(ws.home)
        model, data = str(paths.model_dir), str(paths.data_dir)
        if not args.json:
            render.console.print(
                f"built the demo model at {paths.model_dir} and datasets in {paths.data_dir}"
            )
    else:
        if not args.model:
            raise UserError(
                "ftctl init needs --model (an mlx-lm model folder, a Hugging Face repo id or a .gguf "
                "file) or --demo"
            )
        from ftctl.control.setup import init

        note = (
            (lambda *a, **k: None)
            if args.json
            else render.ConsoleReporter(out=render.err_console).note
        )
        _, model = init(ws.home, args.model, dtype=args.dtype, note=note)
    if args.json:
        render.print_json(
            {"home": str(ws.home), "config": str(ws.config_path), "model": model, "demo_data": data}
        )
    else:
        render.console.print(
            f"[green]initialised[/] workspace {ws.home} (journal, ftctl.yaml, inbox/, jobs/, models/, logs/)"
        )
    return 0


def add_demo(p) -> None:
    p.add_argument(
        "--reset",
        action="store_true",
        help="delete the demo workspace first (only one `ftctl demo` made)",
    )
    p.add_argument(
        "--kill-at", type=int, default=17, metavar="STEP", help="step at which the worker is killed"
    )


def cmd_demo(args, ws) -> int:
    """Init a demo workspace, train a job end to end, kill its worker mid-run, show the recovery.
    Its folder is --home if given on this command, else ./ftctl-demo (never $FTCTL_HOME: that is
    where a user's real workspace lives)."""
    from ftctl.control.demo import tour

    from .args import run as ftctl

    home = ws.home if getattr(args, "home", None) else Path("ftctl-demo").resolve()
    t = tour(home, reset=args.reset, kill_at=args.kill_at, report=render.ConsoleReporter())
    render.console.rule("4. the journal tells the story")
    ftctl(["history", "--home", str(home)])
    render.console.rule("5. status of the finished job")
    ftctl(["status", t.job, "--home", str(home)])
    if t.killed_at:
        render.console.rule("6. reproduce the crash: a property of the run, or of the environment?")
        ftctl(["reproduce", t.job, "--home", str(home)])
    killed = (
        f"killed at step {', '.join(map(str, t.killed_at))} and resumed"
        if t.killed_at
        else "never killed (the journal records no kill)"
    )
    render.console.print(
        f"adapter sha256, {killed}: {t.sha256}\n"
        f"adapter sha256, {'never interrupted':<{len(killed)}}: {t.reference_sha256}"
    )
    if t.proven:
        render.console.print(
            "[green]identical[/], from the same data and config (sha256 checked in both journals), with "
            f"the kill at step {t.kill_at} recorded: the resume was bit-for-bit (weights, optimizer, "
            "LR position, data cursor and RNG all restored)"
        )
    elif t.killed_at != [t.kill_at]:
        render.err_console.print(
            f"[red]not shown[/]: the journal records the worker killed at {t.killed_at or 'no step'}, "
            f"not once at step {t.kill_at}; this run proves nothing about resuming"
        )
    elif not t.same_inputs:
        render.err_console.print(
            "[red]not comparable[/]: the two jobs recorded different data or config sha256"
        )
    else:
        render.err_console.print(
            "[red]DIFFERENT[/] from the same inputs: the resume was not bit-for-bit. This is a bug: "
            f"please report it with {home}/journal.db"
        )
    render.console.print(
        f"Try: ftctl history --home {home} --crashes · ftctl replay {t.job} --to SEQ --home {home}"
    )
    return 0 if t.proven else (2 if t.killed_at == [t.kill_at] and t.same_inputs else 1)


def add_config_show(p) -> None:
    p.add_argument(
        "--lineage", default="main", help="the lineage whose new jobs it describes (default: main)"
    )
    p.add_argument("--json", action="store_true", help="print the keys, values and sources as JSON")


def cmd_config_show(args, ws) -> int:
    from ftctl.control.effective import effective_config

    ledger = Ledger(ws.open_journal())
    rows, warnings = effective_config(ws, ledger.state, args.lineage)
    if args.json:
        render.print_json({"lineage": args.lineage, "config": rows, "warnings": warnings})
        return 0
    from rich.table import Table

    t = Table(title=f"effective config ({ws.config_path}, lineage {args.lineage})")
    for c in ("key", "value", "source"):
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(
            r["key"],
            render.escape(render.yaml_value(r["value"])),
            f"[dim]{r['source']}[/]" if r["source"] == "default" else r["source"],
        )
    render.console.print(t)
    for w in warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    return 0


def add_completion(p) -> None:
    p.add_argument("shell", choices=("bash", "zsh", "fish"), help="bash, zsh or fish")


def cmd_completion(args, ws) -> int:
    from .args import build_parser
    from .completion import SHELLS

    sys.stdout.write(SHELLS[args.shell](build_parser()))
    return 0
