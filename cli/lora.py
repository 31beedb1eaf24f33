"""`ftctl lora`: mlx_lm.lora's command line (its every flag, -c/--config), run as a crash-proof job.

The flags are declared here, not borrowed from mlx-lm's parser: building ftctl's parser must not
import MLX (`ftctl status` starts in well under a second). tests/test_lora.py compares them with the
installed mlx-lm's build_parser(), so an mlx-lm upgrade that adds a flag fails a test.
"""

from __future__ import annotations

import argparse
import signal
from decimal import Decimal, InvalidOperation
from pathlib import Path

from . import render

# mlx_lm.lora's flags: (option strings, config key, argparse keywords). Every one defaults to None
# (given or not: mlx-lm's precedence is the flag over the -c file over its defaults).
_SIZES = {"M": 10**6, "G": 10**9, "MB": 10**6, "GB": 10**9, "": 1}


def size(text: str) -> int:
    """mlx-lm's --clear-cache-threshold: bytes, or with a unit (500M, 1.5GB)."""
    digits = text.strip()
    n = len(digits) - len(digits.lstrip("0123456789."))
    try:
        return int(Decimal(digits[:n]) * _SIZES[digits[n:].strip().upper()])
    except (InvalidOperation, KeyError):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: bytes, or a number with M, MB, G or GB (e.g. 1GB)"
        ) from None


FLAGS: list[tuple[tuple[str, ...], dict]] = [
    (
        ("--model",),
        {
            "help": "the base model: an mlx-lm folder, a Hugging Face repo id (local cache) or a .gguf"
        },
    ),
    (
        ("--train",),
        {"action": "store_true", "help": "train (with --test: then score the test split)"},
    ),
    (
        ("--data",),
        {
            "help": "a folder of train.jsonl, valid.jsonl[, test.jsonl], or a Hugging Face dataset "
            "(local cache or save_to_disk folder)"
        },
    ),
    (("--fine-tune-type",), {"choices": ["lora", "dora", "full"], "help": "lora, dora or full"}),
    (
        ("--optimizer",),
        {"choices": ["adam", "adamw", "muon", "sgd", "adafactor"], "help": "the mlx optimizer"},
    ),
    (("--mask-prompt",), {"action": "store_true", "help": "train on completions only"}),
    (("--num-layers",), {"type": int, "help": "layers to fine-tune, from the last (-1: all)"}),
    (("--batch-size",), {"type": int, "help": "examples per iteration"}),
    (("--iters",), {"type": int, "help": "iterations to train for"}),
    (("--val-batches",), {"type": int, "help": "validation batches (-1: the whole split)"}),
    (("--learning-rate",), {"type": float, "help": "the learning rate"}),
    (("--steps-per-report",), {"type": int, "help": "iterations between loss reports"}),
    (("--steps-per-eval",), {"type": int, "help": "iterations between validations"}),
    (("--grad-accumulation-steps",), {"type": int, "help": "iterations per optimizer update"}),
    (
        ("--resume-adapter-file",),
        {"help": "start from these adapter weights (copied into the job, sha256 recorded)"},
    ),
    (
        ("--adapter-path",),
        {
            "help": "where the finished adapter is published (default adapters/; never over a "
            "folder ftctl did not write)"
        },
    ),
    (("--save-every",), {"type": int, "help": "checkpoint every N iterations"}),
    (("--test",), {"action": "store_true", "help": "score the test split after training"}),
    (("--test-batches",), {"type": int, "help": "test batches (-1: the whole split)"}),
    (("--max-seq-length",), {"type": int, "help": "longer examples are truncated"}),
    (
        ("-c", "--config"),
        {"help": "an mlx-lm YAML config file (ftctl's own keys may go in it too)"},
    ),
    (
        ("--grad-checkpoint",),
        {"action": "store_true", "help": "recompute activations to save memory"},
    ),
    (
        ("--clear-cache-threshold",),
        {"type": size, "help": "free MLX's cache after a step when it holds more (bytes, or 1GB)"},
    ),
    (
        ("--report-to",),
        {"help": "also log to wandb and/or swanlab (offline/local; package installed)"},
    ),
    (("--project-name",), {"help": "the trackers' project name"}),
    (("--seed",), {"type": int, "help": "the random seed"}),
    (("--trust-remote-code",), {"action": "store_true", "help": "let the model's own code run"}),
    # mlx-lm-lora's preference training flags (mlx_lm_lora.train), for the modes ftctl trains
    (
        ("--train-mode",),
        {
            "choices": ["sft", "dpo", "orpo"],
            "help": "sft, or dpo / orpo on prompt/chosen/rejected pairs (mlx-lm-lora's)",
        },
    ),
    (("--beta",), {"type": float, "help": "dpo/orpo: the preference term's strength"}),
    (
        ("--dpo-cpo-loss-type",),
        {"choices": ["sigmoid", "hinge", "ipo", "dpop"], "help": "dpo: the loss type"},
    ),
    (("--delta",), {"type": float, "help": "dpo with dpop: the penalty's weight"}),
    (
        ("--reference-model-path",),
        {"help": "dpo: a reference model folder (default: the base model, no second copy)"},
    ),
]


def add_lora(p) -> None:
    for names, kw in FLAGS:
        p.add_argument(*names, default=None, **kw)
    p.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="set a key mlx-lm has no flag for (retention.keep_last=5, max_grad_norm=1.0; repeatable)",
    )
    p.add_argument(
        "--lineage",
        help="join this lineage (warm start from its adapter, consolidation); default: the job's own",
    )
    p.add_argument(
        "--again",
        action="store_true",
        help="train again even if the same data and config already completed",
    )
    p.add_argument("--quiet", action="store_true", help="no progress output")


def _flags(args) -> dict:
    """The mlx-lm flags the user gave, by config key (argparse's dest is the key)."""
    keys = {kw.get("dest") or names[-1].lstrip("-").replace("-", "_") for names, kw in FLAGS}
    return {k: getattr(args, k) for k in keys if k != "config" and getattr(args, k) is not None}


def cmd_lora(args, ws) -> int:
    # first thing, a worker for the job: its imports overlap everything this command does before it
    # trains. With a -c file it may say `train: true` (mlx-lm's example configs do): started before the
    # file is read, and dismissed below if the run turns out not to train
    from ftctl.control.standby import early

    spare = early(ws) if args.train or args.config else None
    try:
        return _lora(args, ws, spare)
    finally:
        if spare is not None:
            spare.dismiss()  # not taken (refused, done, another daemon's): never left behind


def _lora(args, ws, spare) -> int:
    from ftctl.control import lora

    report = render.ConsoleReporter(quiet=args.quiet)
    cfg, warnings = lora.resolve(
        ws, _flags(args), Path(args.config) if args.config else None, args.set or []
    )
    for w in warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    if not cfg.train and not cfg.test:
        raise lora.LoraRefused(
            "ftctl lora needs --train or --test (or train: true / test: true in the -c file), as "
            "mlx_lm.lora does"
        )
    if not cfg.train:
        if spare is not None:
            spare.dismiss()  # now, not after the scoring: its imports would compete with it
        return _test_only(ws, cfg)
    ws = lora.ensure_workspace(ws, cfg, report.note)
    daemon = lora.own_daemon(ws, cfg, report, spare)  # it takes the spare, still importing
    try:
        q = lora.queue(ws, cfg, [], lineage=args.lineage, again=args.again, note=report.note)
        if q.how == "rejected":
            return _rejected(q.submission)
        if q.submission is not None:
            for w in q.submission.warnings:
                render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
        if q.how == "done":
            report.note(
                f"job {q.job} already trained this (the same data and config; --again trains it again)"
            )
            return _result(ws, q.job, interrupted=False)
        report.note(
            f"job {q.job} {'resumed: an earlier run of this command' if q.how == 'resumed' else 'queued'} "
            f"(workspace {ws.home}; `ftctl status {q.job} --home {ws.home}`)"
        )
        return _run(ws, q.job, report, daemon)
    finally:
        if daemon is not None:
            daemon.standby.dismiss()  # not taken (refused, done, another daemon): never left behind


def _run(ws, job: str, report, daemon) -> int:
    """Train the job with ``daemon``, this command's own, or follow it under the one that runs."""
    from ftctl.control import lora
    from ftctl.control.daemon import DaemonError

    asked: list[str] = []
    if daemon is not None:
        daemon.until_job = job

        def stop(signum, frame):
            asked.append(signal.Signals(signum).name)
            daemon.stop(asked[-1])

        old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            daemon.run()
            return _result(ws, job, interrupted=bool(asked))
        except DaemonError:  # another daemon took the lock first: follow it instead
            daemon.standby.dismiss()
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    report.note(
        f"a daemon runs on {ws.home}: following job {job} (Ctrl-C pauses it, checkpoint first)"
    )
    old = {
        s: signal.signal(s, lambda n, f: asked.append(signal.Signals(n).name))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        lora.follow(ws, job, report, lambda: bool(asked))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    return _result(ws, job, interrupted=bool(asked))


def _result(ws, job: str, interrupted: bool) -> int:
    from ftctl.control import lora

    j = lora.job(ws, job)
    if j.state == "completed":
        where = j.exported_to or j.adapter_path
        render.console.print(
            f"Saved final weights to {render.escape(str(Path(where) / 'adapters.safetensors'))}."
        )
        from ftctl.control.status import describe_result

        early = f" (stopped early: `ftctl status {j.job}` says why)" if j.stopped_early else ""
        render.console.print(
            f"[green]job {j.job} completed[/] at step {j.step}{early}: adapter sha256 {j.adapter_sha256[:16]}… "
            f"{render.escape(describe_result(j))} (also in {render.escape(j.adapter_path)})"
        )
        if j.export_refused:
            render.err_console.print(
                f"[yellow]adapter_path not written:[/] {render.escape(j.export_refused)}"
            )
        if j.last_eval is not None and j.config.test:
            _show_eval(ws, j.last_eval, None, j.config.fine_tune_type)
        return 1 if j.export_refused else 0
    good = j.good_checkpoints()
    kept = (
        f"its checkpoint at step {good[-1].step} is kept"
        if good
        else "no checkpoint was written yet"
    )
    if interrupted and j.state in ("queued", "paused"):
        render.err_console.print(
            f"job {j.job} stopped ({kept}): run the same command again to resume it, bit for bit"
        )
        return 130
    render.err_console.print(
        f"[red]job {j.job} {j.state}[/]: {render.escape(j.reason)} ({kept}; `ftctl status {j.job}`, "
        f"`ftctl crashes`)"
    )
    return 1


def _rejected(sub) -> int:
    for split, r in (("train", sub.report), ("valid", sub.valid_report), ("test", sub.test_report)):
        for p in (r.problems if r else [])[:10]:
            render.err_console.print(
                f"  [yellow]{render.escape(sub.labels.get(split, split))}:{p.line}[/] {render.escape(p.reason)}"
            )
    render.err_console.print(
        f"[red]rejected[/] job {sub.job}: " + render.escape("; ".join(sub.reasons))
    )
    render.err_console.print(
        "The data was left untouched and nothing was queued. Fix the lines above and run again."
    )
    return 1


def _test_only(ws, cfg) -> int:
    from ftctl.control import lora

    out = lora.test_only(ws, cfg)
    for w in out.warnings:
        render.err_console.print(f"[yellow]warning:[/] {render.escape(w)}")
    _show_eval(ws, out.event, out.seq, cfg.fine_tune_type)
    if out.recorded_on is None:
        render.console.print(
            "not recorded: no completed job of this workspace produced this adapter (sha256 "
            f"{out.event.adapter_sha256[:12]}…)"
        )
    return 0


def _show_eval(ws, e, seq, fine_tune_type: str = "lora") -> None:
    render.console.print(
        f"Test loss {e.adapter_loss:.3f}, Test ppl {e.adapter_ppl:.3f}."
        if e.adapter_loss is not None and e.adapter_ppl is not None
        else "Test loss not finite."
    )
    tuned = "trained layers (full fine-tune)" if fine_tune_type == "full" else "adapter"
    render.console.print(render.eval_table(e, ws, tuned))
    render.console.print(render.eval_verdict(e) + (f" (recorded as event {seq})" if seq else ""))
