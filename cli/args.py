"""The parser, built from the command table (cli/table.py), with manners: a user error exits 1 with
one clear line (a typo gets "did you mean"), and every command's --help has the table's description
and example (docs/cli.md says the same)."""

from __future__ import annotations

import argparse
import difflib
import importlib
import math
import shutil
import sys
import textwrap

from . import render
from .table import COMMANDS, Command, Group


def port(text: str) -> int:
    """A TCP port for --port: 1..65535, or 0 for any free one (the address printed is the real one)."""
    try:
        n = int(text)
    except ValueError:
        n = -1
    if not 0 <= n <= 65535:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a TCP port: give a number from 1 to 65535 (0: any free port)"
        )
    return n


def seconds(text: str) -> float:
    """A duration for --wait: a finite number of seconds, 0 or more."""
    try:
        s = float(text)
    except ValueError:
        s = math.nan
    if not (math.isfinite(s) and s >= 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of seconds: give 0 or more, e.g. 60"
        )
    return s


class Parser(argparse.ArgumentParser):
    """Bad usage is a user error: exit 1 (not argparse's 2) with one clear line."""

    def _subcommands(self) -> argparse._SubParsersAction | None:
        return next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)

    def _check_value(self, action, value):
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            close = difflib.get_close_matches(value, list(action.choices), n=1)
            hint = (
                f"did you mean {close[0]!r}?"
                if close
                else "the commands are " + ", ".join(action.choices)
            )
            self.error(
                f"{self.prog}: unknown command {value!r} ({hint}). `{self.prog} --help` lists them."
            )
        super()._check_value(action, value)

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:
            self._unknown_options(ns, extras)
        return ns

    def _unknown_options(self, ns: argparse.Namespace, extras: list[str]):
        """`ftctl submit --vaild x`: name the command and the closest option instead of argparse's list."""
        parser, names = self, []
        while (sub := parser._subcommands()) is not None and getattr(
            ns, sub.dest, None
        ) in sub.choices:
            names.append(getattr(ns, sub.dest))
            parser = sub.choices[names[-1]]
        known = [o for a in parser._actions for o in a.option_strings]
        word = next((x for x in extras if x.startswith("-")), extras[0])
        close = (
            difflib.get_close_matches(word.split("=")[0], known, n=1)
            if word.startswith("-")
            else []
        )
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        what = "option" if word.startswith("-") else "argument"
        parser.error(
            f"{parser.prog}: unknown {what} {word!r}{hint}. `{parser.prog} --help` lists what it takes."
        )

    def error(self, message: str):
        sub = self._subcommands()
        if (
            sub is not None
            and message.startswith("the following arguments are required")
            and (sub.metavar or sub.dest) in message
        ):
            message = (
                f"{self.prog} needs a command: {', '.join(sub.choices)}. "
                f"`{self.prog} --help` says what each does."
            )
        elif sub is None:
            self.print_usage(sys.stderr)
        render.err_console.print(f"[red]error:[/] {render.escape(message)}")
        sys.exit(1)


def build_parser(argv: list[str] | None = None) -> Parser:
    """`ftctl`'s parser, from the command table (cli/table.py). With ``argv``, only the command it
    names gets its arguments (and only its module is imported); without, every command does (shell
    completion, the docs tests)."""
    home = argparse.ArgumentParser(add_help=False)
    home.add_argument(
        "--home",
        default=argparse.SUPPRESS,
        help="workspace directory (default: $FTCTL_HOME or ~/.ftctl)",
    )
    p = Parser(
        prog="ftctl",
        description="Crash-proof controller for MLX LoRA fine-tuning.",
        parents=[home],
        epilog="Start with `ftctl demo`, or `ftctl init --model PATH`, `ftctl submit FILE.jsonl`, "
        "`ftctl start`. `ftctl COMMAND --help` describes each command.",
    )
    p.add_argument("--version", action=_Version, nargs=0, help="print ftctl's version and exit")
    wanted = None if argv is None else named(argv)
    _add(p, "", home, wanted)
    return p


def named(argv: list[str]) -> str:
    """The command ``argv`` names ("status", "service install"), as far as the table knows it."""
    words, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--home":
            skip = True
        elif not a.startswith("-"):
            words.append(a)
    path = ""
    for w in words:
        if f"{path} {w}".strip() not in COMMANDS:
            break
        path = f"{path} {w}".strip()
        if not isinstance(COMMANDS[path], Group):
            break
    return path


def _add(parser: argparse.ArgumentParser, path: str, home, wanted: str | None) -> None:
    """The subcommands of ``path`` ("" for the top), each described; the arguments of those wanted."""
    children = [n for n in COMMANDS if n.rpartition(" ")[0] == path and n != path]
    sub = parser.add_subparsers(
        dest=f"{path.replace(' ', '_')}_command" if path else "command",
        required=True,
        parser_class=Parser,
        metavar="COMMAND",
        help="one of:",
    )
    for name in children:
        c = COMMANDS[name]
        s = sub.add_parser(name.rpartition(" ")[2], parents=[home], help=c.help)
        s.description = textwrap.fill(
            c.description, width=min(shutil.get_terminal_size().columns, 100) - 2
        )
        s.epilog = "example:\n  " + c.example
        s.formatter_class = argparse.RawDescriptionHelpFormatter
        if isinstance(c, Group):
            _add(s, name, home, wanted)
        elif wanted is None or wanted == name:
            getattr(module(c), f"add_{c.args or c.handler}")(s)
            s.set_defaults(_command=name, **c.defaults)


def module(c: Command):
    return importlib.import_module(f"ftctl.cli.{c.module}")


def dispatch(args: argparse.Namespace, ws) -> int:
    """Run the command ``args`` were parsed for, on workspace ``ws``: its exit code. Errors are the
    caller's to report (cli/main.py)."""
    c = COMMANDS[args._command]
    return getattr(module(c), f"cmd_{c.handler}")(args, ws)


def run(argv: list[str]) -> int:
    """Parse ``argv`` and run the command it names (a command that runs others: the demo)."""
    from ftctl.adapters.workspace import resolve_home

    args = build_parser(argv).parse_args(argv)
    return dispatch(args, resolve_home(getattr(args, "home", None)))


class _Version(argparse.Action):
    """--version: reads the package version only when asked (importlib.metadata is not free)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from ftctl.control.daemon import VERSION

        sys.stdout.write(f"ftctl {VERSION}\n")
        parser.exit()
