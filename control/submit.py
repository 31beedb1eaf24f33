"""Submitting data: validate before queuing, copy the data into the job, then commit.

Used by `ftctl submit` and by the daemon's inbox watcher, so both behave the same.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ftctl.adapters import hfdata, system
from ftctl.adapters.checkpoint import export_problem
from ftctl.adapters.fs import UnreadableFile, read_input, write_durable
from ftctl.adapters.group import problems as group_problems
from ftctl.adapters.model import (
    checkpoint_estimate,
    is_repo_id,
    model_problem,
    quantized,
    safetensors_names,
    shape,
)
from ftctl.adapters.workspace import Workspace
from ftctl.control.ledger import Ledger
from ftctl.core import fit
from ftctl.core.config import (
    TRACKERS,
    Config,
    ConfigError,
    config_sha256,
    config_warnings,
    features,
    hf_entries,
    job_config,
    keep_last,
    locked_changes,
    resolve_epochs,
)
from ftctl.core.dataset import (
    DataReport,
    Features,
    long_records,
    valid_records,
    validate_jsonl,
)
from ftctl.core.retention import disk_needed_gb
from ftctl.core.state import job_stream
from ftctl.events import types as ev
from ftctl.events.errors import UserError
from ftctl.events.journal import ConcurrencyError

from . import models
from .reporter import Note, quiet

_MODEL_FIX = (
    "set `model` in ftctl.yaml (or pass --set model=...) to an mlx-lm model folder, a cached Hugging Face "
    "repo id or a .gguf file, and submit again"
)
HOLDOUT_EVERY = 20  # without --valid, every 20th valid example is held out for validation
# Tokens a chat template may add beyond the JSON syntax around an example's text (a role header, an
# injected system line): a line of at most max_seq_length - TEMPLATE_SLACK bytes cannot reach
# max_seq_length tokens, since every token of the text is at least one byte of it.
TEMPLATE_SLACK = 64
RESUME_ADAPTER = "resume_adapters.safetensors"  # the job's copy of its resume_adapter_file
OWN_LINEAGE = "lora-"  # a job submitted without a lineage gets its own: lora-<job id>


class SubmitError(UserError):
    """Submission refused before anything was recorded."""

    kept = "nothing was queued; the data file is untouched"


class DuplicateSubmission(SubmitError):
    """The same data with the same resolved config is already a job; ``--again`` queues it anyway."""

    def __init__(self, message: str, job: str, *, do: str = ""):
        super().__init__(message, do=do)
        self.job = job


@dataclass
class Submission:
    job: str
    state: str
    report: DataReport
    valid_report: DataReport | None
    warnings: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    test_report: DataReport | None = None
    labels: dict[str, str] = field(default_factory=dict)  # split -> where its lines come from


@dataclass
class Source:
    """The data a submission names, read: each split's bytes and where its lines come from."""

    path: str  # what the job records as its data_path
    train: bytes
    valid: bytes | None = None
    test: bytes | None = None
    labels: dict[str, str] = field(default_factory=dict)
    valid_path: str | None = None
    folder: bool = False  # mlx-lm's layout (or a dataset): its splits are as given, none held out


def _hf(what: str, load) -> dict[str, bytes]:
    try:
        return load()
    except hfdata.HFDataError as e:
        raise SubmitError(f"{e}; nothing was queued") from None


def read_source(path, valid: Path | None, cfg: Config, cwd: Path) -> Source:
    """The data of a submission: FILE (+ --valid), a folder of train/valid/test.jsonl, a dataset in
    the local Hugging Face datasets cache or a save_to_disk folder; with no path, `hf_dataset:` or
    `data:` of the config."""
    if path is None:
        if cfg.hf_dataset is not None:
            if valid is not None:
                raise SubmitError(
                    "--valid does not go with hf_dataset (its valid_split is the validation data)"
                )
            entries = hf_entries(cfg)
            splits = _hf("hf_dataset", lambda: hfdata.load(entries, test=cfg.test))
            where = " + ".join(e.path for e in entries)
            return Source(
                path=f"hf_dataset {where}",
                train=splits["train"],
                valid=splits.get("valid") or None,
                test=splits.get("test"),
                labels={s: f"hf_dataset {where} ({s} split) row" for s in splits},
                folder=True,
            )
        if cfg.data is None:
            raise SubmitError(
                "no data named: give a JSONL file or a folder of train.jsonl/valid.jsonl/test.jsonl "
                "(`ftctl submit FILE|DIR`), or set data: or hf_dataset: in the config; nothing was queued"
            )
        path = cfg.data
    p = (cwd / Path(path).expanduser()).resolve()
    if p.is_dir() and not hfdata.is_saved(p):
        if valid is not None:
            raise SubmitError(
                f"--valid does not go with a folder: {p} brings its own valid.jsonl (mlx-lm's layout); "
                "nothing was queued"
            )
        if not (p / "train.jsonl").is_file():
            raise SubmitError(
                f"{p} is a folder without train.jsonl: mlx-lm's layout is train.jsonl, valid.jsonl and "
                "optionally test.jsonl in one folder; nothing was queued"
            )
        src = Source(path=str(p), train=_read(p / "train.jsonl", "training file"), folder=True)
        src.labels["train"] = str(p / "train.jsonl")
        for split in ("valid", "test"):
            f = p / f"{split}.jsonl"
            if f.is_file():
                setattr(src, split, _read(f, f"{split} file"))
                src.labels[split] = str(f)
        src.valid_path = src.labels.get("valid")
        return src
    if p.is_file() or hfdata.is_saved(p) or not _dataset_name(str(path)):
        if hfdata.is_saved(p):
            splits = _hf("data", lambda: hfdata.load_named(str(p), features(cfg)))
            return _named_source(str(p), splits)
        src = Source(path=str(p), train=_read(p, "data file"), labels={"train": str(p)})
        if valid is not None:
            v = (cwd / Path(valid).expanduser()).resolve()
            src.valid, src.valid_path = _read(v, "validation file"), str(v)
            src.labels["valid"] = str(v)
        return src
    splits = _hf(
        "data", lambda: hfdata.load_named(str(path), features(cfg))
    )  # mlx-lm: a dataset name
    return _named_source(str(path), splits)


def _dataset_name(spec: str) -> bool:
    """``org/name`` that is no path: mlx-lm reads it as a Hugging Face dataset (a .jsonl is a file)."""
    return is_repo_id(spec) and not spec.lower().endswith(".jsonl")


def _named_source(name: str, splits: dict[str, bytes]) -> Source:
    if "train" not in splits:
        raise SubmitError(
            f"dataset {name} has no train split (its splits: {', '.join(splits)}); nothing was queued"
        )
    return Source(
        path=name,
        train=splits["train"],
        valid=splits.get("valid"),
        test=splits.get("test"),
        labels={s: f"{name} ({s} split) row" for s in splits},
        folder=True,
    )


def _read(path: Path, what: str) -> bytes:
    try:
        return read_input(path, what)
    except UnreadableFile as e:
        raise SubmitError(str(e)) from None


def _problems(report: DataReport, limit: int = 20) -> list[str]:
    return [f"line {p.line}: {p.reason}" for p in report.problems[:limit]]


def held_lines(data: bytes, report: DataReport, batch_size: int) -> set[int]:
    """The lines (1-based) held out for validation when no --valid file is given: every
    HOLDOUT_EVERY-th valid line (deterministic)."""
    bad = {p.line for p in report.problems}
    lines = data.splitlines(keepends=True)
    good = [i for i, l in enumerate(lines, 1) if l.strip() and i not in bad]
    held = set(good[HOLDOUT_EVERY - 1 :: HOLDOUT_EVERY])
    if len(held) < batch_size:
        # Too few for one validation batch at every 20th: hold out just enough, from the end.
        held = set(good[-batch_size:]) if len(good) >= 4 * batch_size else set()
    return held


def _split(data: bytes, report: DataReport, batch_size: int) -> tuple[bytes, bytes | None]:
    """(train, validation) of a file submitted without --valid: see held_lines."""
    held = held_lines(data, report, batch_size)
    lines = data.splitlines(keepends=True)
    if not held:
        return data, None
    train = b"".join(
        l if l.endswith(b"\n") else l + b"\n" for i, l in enumerate(lines, 1) if i not in held
    )
    valid = b"".join(
        l if l.endswith(b"\n") else l + b"\n" for i, l in enumerate(lines, 1) if i in held
    )
    return train, valid


def _longer_than(
    data: bytes, cfg: Config, limit: int, what: str, features: Features, note: Note
) -> tuple[list[tuple[int, int]], int]:
    """(line, tokens) of the examples longer than `limit` tokens, counted with the job's own tokenizer
    and template, and how many examples there are; only the lines long enough to reach the limit are
    tokenized (see TEMPLATE_SLACK: the tokenizer is loaded only when there is one). Raises what the
    tokenizer raises."""
    long = long_records(data, limit - TEMPLATE_SLACK, features)
    if not long:
        return [], 0
    from ftctl.adapters.batches import token_lengths  # MLX and the tokenizer load only here

    note(
        f"{what}: counting the tokens of its {len(long)} longest example(s) with the model's tokenizer"
    )
    records = valid_records(data, features)
    lengths = token_lengths(cfg.model, [records[i] for i, _ in long], cfg.mask_prompt)
    return [(line, n) for (_, line), n in zip(long, lengths) if n > limit], len(records)


def _which(over: list[tuple[int, int]], limit: int) -> str:
    line, most = max(over, key=lambda x: x[1])
    shown = ", ".join(str(l) for l, _ in over[:5]) + (", …" if len(over) > 5 else "")
    return (
        f"lines {shown}; the longest, line {line}, has {most:,} tokens; "
        f"{sum(n - limit for _, n in over):,} tokens"
    )


def overlong(
    data: bytes, cfg: Config, what: str, features: Features, note: Note = quiet
) -> list[str]:
    """A warning when examples are longer than max_seq_length tokens: the trainer cuts them there (as
    mlx-lm does) without a word."""
    limit = cfg.max_seq_length
    try:
        over, total = _longer_than(data, cfg, limit, what, features, note)
    except Exception as e:  # noqa: BLE001 (a tokenizer that cannot load here fails the worker's load too)
        return [
            f"{what}: the lengths of its longest examples could not be counted against "
            f"max_seq_length = {limit} tokens ({type(e).__name__}: {e}); any longer than that is "
            "cut to it in training"
        ]
    if not over:
        return []
    return [
        f"{what}: {len(over)} of {total} examples are longer than max_seq_length = {limit} "
        f"tokens and are cut to it ({_which(over, limit)} in all are never trained on or scored): raise "
        "max_seq_length (--set max_seq_length=N) or split those examples"
    ]


def past_context(
    splits: list[tuple[bytes, str]], cfg: Config, features: Features, note: Note = quiet
) -> list[str]:
    """max_seq_length above the model's context (mlx-lm's default 2048 on a 512-token model) matters
    only for an example longer than that context: it would train past the positions the model was
    built for (a crash at the first such batch for learned position embeddings). With none, nothing
    is cut either way and the run is mlx-lm's own: accepted."""
    facts = shape(cfg.model)
    if facts.context is None or cfg.max_seq_length <= facts.context:
        return []
    ctx = facts.context
    head = (
        f"max_seq_length = {cfg.max_seq_length}, but the model's context is {ctx} tokens "
        f"({facts.context_key} in its config.json)"
    )
    fix = f"set max_seq_length to {ctx} or less (those examples are cut there), or shorten them"
    out = []
    for data, what in splits:
        try:
            over, total = _longer_than(data, cfg, ctx, what, features, note)
        except Exception as e:  # noqa: BLE001 (uncounted: refuse as if they were longer)
            return [
                f"{head}, and the examples' lengths could not be counted ({type(e).__name__}: {e}): {fix}"
            ]
        if over:
            out.append(
                f"{head}, and {what} has {len(over)} of {total} examples longer than that "
                f"({_which(over, ctx)} past it in all): {fix}"
            )
    return out


def _same_kind(fmt: str | None) -> str | None:
    return "chat" if fmt == "conversations" else fmt  # conversations rows are trained as chat


def _valid_name(src: Source) -> str:
    return Path(src.valid_path).name if src.valid_path else "split 'valid'"


def _check_valid(src: Source, report: DataReport, vreport: DataReport) -> list[str]:
    """The validation data against the training data: the same file is refused (a val loss on the
    training data measures fit, not generalization, and keep_best retention and `ftctl eval` would
    choose and judge by it); another format, or examples both files hold, are warned about."""
    data, vdata = src.train, src.valid
    if hashlib.sha256(vdata).digest() == hashlib.sha256(data).digest():
        if src.folder:
            train = Path(src.labels.get("train", src.path)).name
            what = f"{_valid_name(src)} is {train}"
            fix = "Put held-out examples in it, or remove it to train without validation (as mlx-lm does)"
        else:
            what = f"--valid {src.valid_path} is the training file {Path(src.path).name}"
            fix = f"Pass a held-out file, or leave --valid out to hold out every {HOLDOUT_EVERY}th example"
        raise SubmitError(
            f"{what} itself (the same sha256): the validation loss would measure how well the model "
            "fits the examples it trains on, not how it does on unseen ones — and retention's keep_best "
            f"and `ftctl eval` would choose and judge checkpoints by it. Nothing was queued. {fix}"
        )
    out = []
    fmt, vfmt = _same_kind(report.format), _same_kind(vreport.format)
    if fmt and vfmt and fmt != vfmt:
        why = (
            "one is plain text, the other goes through the model's chat template, so the val loss "
            "measures the model on another kind of input than it trains on (it can watch for forgetting, "
            "not show how well the task is learned)"
            if "text" in (fmt, vfmt)
            else "both go through the chat template, but as other message structures, so the val loss "
            "is comparable with the training loss only loosely"
        )
        out.append(
            f"validation file: it is '{vreport.format}' data, the training file '{report.format}': "
            f"{why}. If that is not what you want, convert it to '{report.format}'"
            + (
                ""
                if src.folder
                else f", or leave --valid out to hold out every {HOLDOUT_EVERY}th example"
            )
        )
    train = {l.strip() for l in data.split(b"\n") if l.strip()}
    vlines = [l.strip() for l in vdata.split(b"\n") if l.strip()]
    shared = sum(l in train for l in vlines)
    if shared:
        out.append(
            f"validation file: {shared} of its {len(vlines)} lines are also in the training file: the val "
            "loss on those measures fit, not generalization (remove them from one of the files)"
        )
    return out


def _next_job_id(ledger: Ledger) -> str:
    n = len(ledger.state.jobs) + 1
    while f"{n:04d}" in ledger.state.jobs:
        n += 1
    return f"{n:04d}"


def _lineage_config(ledger: Ledger, lineage: str, cfg: Config) -> Config:
    """Resolve the job's config against its lineage: it trains on the lineage's current base, and
    may not change what shapes an adapter that is not consolidated yet (the config lock)."""
    lin = ledger.state.lineages.get(lineage)
    if lin is None:
        return cfg
    if cfg.model not in (lin.origin_model, lin.base_model):
        raise SubmitError(
            f"lineage {lineage!r} trains on {lin.base_model}, not {cfg.model}",
            do="a different base model starts a new lineage: submit with --lineage NAME",
        )
    cfg = msgspec.structs.replace(cfg, model=lin.base_model)
    chain = [ledger.state.jobs[j] for j in lin.jobs]
    live = [j for j in chain if j.state not in ("rejected", "cancelled", "failed")]
    if live:
        ref = live[-1]
        changed = locked_changes(ref.config, cfg)
        if changed:
            raise SubmitError(
                f"lineage {lineage!r} has an adapter that is not consolidated yet (job {ref.job}, "
                f"{ref.state}); this submission changes what shapes it — {'; '.join(changed)} — "
                "which would silently break its warm start and its fusion",
                do="either consolidate first (`ftctl consolidate`, after the lineage's jobs finish) "
                "so that new jobs start a fresh adapter on the fused base, or start a new lineage "
                "explicitly (`--lineage NAME`)",
            )
    return cfg


def _how_long(
    cfg: Config, warnings: list[str], train_examples: int, has_valid: bool, ws: Workspace
) -> tuple[Config, list[str]]:
    """The run the job records (issue 20: full fine-tuning, epochs, early stopping, the result):
    ``epochs`` turned into ``iters`` for this training data, a full fine-tune checked against its
    model, and the config's warnings for what it will really run — among them what a full
    fine-tune's checkpoints take on disk (and whether the workspace's disk has room for them now),
    and keys that need validation data the job lacks."""
    try:
        run = resolve_epochs(cfg, train_examples)
    except ConfigError as e:
        raise SubmitError(f"{e}; nothing was queued") from None
    if run is not cfg:  # the config's own warnings, for the iters it will really run
        stale = config_warnings(cfg)
        warnings = config_warnings(run) + [w for w in warnings if w not in stale]
    cfg, warnings = run, list(warnings)
    if cfg.epochs is not None:
        warnings.append(
            f"epochs = {cfg.epochs}: iters = {cfg.iters} ({cfg.iters // cfg.epochs} batches of "
            f"{cfg.batch_size} per epoch)"
        )
    if cfg.fine_tune_type == "full":
        here = ws.located(cfg)  # the model's folder where it is now
        if quantized(here.model):
            raise SubmitError(
                f"fine_tune_type: full trains the weights themselves, but {here.model} is quantized: "
                "they cannot be trained",
                do="use lora or dora (QLoRA), or a float copy of the model (`ftctl init --model "
                "FILE.gguf --dtype float16`, or mlx_lm.convert without -q)",
            )
        size = checkpoint_estimate(here)
        shown = f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"
        warnings.append(
            f"full fine-tuning: each checkpoint holds the trained layers' weights and the "
            f"{cfg.optimizer} state, about {shown} here; retention keeps the newest "
            f"{keep_last(cfg)} (retention.keep_last), the best and the one being written, and the "
            "start of the job checks the disk has room for them"
        )
        need, why = disk_needed_gb(cfg, size / system.GB, 0)
        free = system.free_disk_gb(ws.home)
        if free < need:
            warnings.append(
                f"only {free:.2f} GB free on {ws.home} now, and this full fine-tune needs about "
                f"{need:.2f} GB ({why}): the daemon pauses it at its start until there is room "
                "(free space, or lower retention.keep_last or num_layers)"
            )
    if not has_valid:
        if cfg.early_stopping is not None:
            warnings.append(
                "early_stopping needs validation data, and this job has none: it trains all its iters"
            )
        if cfg.result == "best":
            warnings.append(
                "result: best needs validation data, and this job has none: the last step's adapter "
                "is published"
            )
    return cfg, warnings


def resolve_model(
    ws: Workspace, ledger: Ledger, cfg: Config, note: Note = quiet
) -> tuple[Config, models.Resolved]:
    """``cfg`` with ``model`` as a job records it: a repo id or a GGUF file resolved to the folder it
    names (pinned now), a folder of the workspace relative to it (it moves with the workspace), any
    other folder absolute; and how it was resolved. SubmitError if the model cannot be used."""
    spec = ws.model(cfg.model)  # a relative path names a folder of the workspace (demo/model)
    resolved = models.Resolved(spec)
    if models.needs_resolving(spec):  # a repo id or a GGUF file: the folder it names, pinned now
        try:
            resolved = models.for_job(ws, ledger, spec, note)
        except models.ModelRefused as e:
            raise SubmitError(f"the base model cannot be used: {e}", do=_MODEL_FIX) from None
    return msgspec.structs.replace(cfg, model=ws.rel(resolved.path)), resolved


def _duplicate(ledger: Ledger, path: Path, sha: str, valid_sha: str | None, cfg: Config) -> None:
    """Refuse the same data (and validation data) with the same resolved config as a live job."""
    digest = config_sha256(cfg)
    for j in ledger.state.jobs.values():
        if (
            j.state not in ("rejected", "cancelled", "failed")
            and j.data_sha256 == sha
            and j.config_sha256 == digest
            and j.valid_sha256 == valid_sha
        ):
            raise DuplicateSubmission(
                f"{path.name} was already submitted with the same content (sha256 {sha[:12]}…) and "
                f"the same config as job {j.job} ({j.state})",
                j.job,
                do="to train on it again on purpose, submit it with --again; to change the run, pass "
                "--set KEY=VALUE",
            )


def _check_train_mode(cfg: Config, src: Source, report: DataReport, vreport) -> None:
    """Preference pairs train with train_mode dpo or orpo, and those modes train nothing else."""
    found = {r.format for r in (report, vreport) if r is not None and r.format is not None}
    if cfg.train_mode == "sft" and "preference" in found:
        raise SubmitError(
            f"{src.path} holds preference pairs (prompt/chosen/rejected), which train with "
            "train_mode dpo or orpo, not train_mode sft",
            do="set train_mode: dpo (or orpo) in the config, `--set train_mode=dpo`, or "
            "`ftctl lora --train-mode dpo`",
        )
    other = sorted(found - {"preference"})
    if cfg.train_mode != "sft" and other:
        raise SubmitError(
            f"train_mode {cfg.train_mode} trains preference pairs ({{prompt, chosen, rejected}} per "
            f"line), but {src.path} holds {' and '.join(map(repr, other))} data",
            do="give preference pairs, or set train_mode: sft to train these examples",
        )


def _absolute(cfg: Config, cwd: Path) -> Config:
    """The config's own paths (adapter_path, resume_adapter_file, reference_model_path), absolute:
    relative to where the command runs, as mlx_lm.lora reads them; the job records them so."""
    out = {}
    for key in ("adapter_path", "resume_adapter_file", "reference_model_path"):
        value = getattr(cfg, key)
        if value is not None:
            out[key] = str((cwd / Path(value).expanduser()).resolve())
    return msgspec.structs.replace(cfg, **out) if out else cfg


def _examples(data: bytes, f: Features) -> int:
    r = validate_jsonl(data, f)
    return r.valid - r.undesirable


def _fit(cfg: Config, counts: dict[str, int]) -> list[str]:
    """What submit can know would fail at load: the config against the model and the data."""
    facts = shape(cfg.model)
    out = fit.model_problems(cfg, facts) + fit.data_problems(cfg, counts)
    if cfg.resume_adapter_file is not None:
        f = Path(cfg.resume_adapter_file)
        if not f.is_file():
            out.append(
                f"resume_adapter_file {f} {'is a folder' if f.is_dir() else 'does not exist'}"
            )
        else:
            try:
                out += fit.resume_problems(cfg, facts, safetensors_names(f), str(f))
            except (ValueError, OSError) as e:
                out.append(f"resume_adapter_file: {e}")
    if cfg.adapter_path is not None:
        problem = export_problem(cfg.adapter_path)
        if problem:
            out.append(
                f"adapter_path: {problem}: name another adapter_path (or remove that folder yourself)"
            )
    for name in (x.strip().lower() for x in (cfg.report_to or "").split(",") if x.strip()):
        if importlib.util.find_spec(TRACKERS[name]) is None:
            out.append(
                f"report_to: {name} needs the {TRACKERS[name]} package, which is not installed: "
                f"`pip install {TRACKERS[name]}` (ftctl runs it offline, no account needed), or drop report_to"
            )
    return out


def submit(
    ws: Workspace,
    ledger: Ledger,
    path: Path | str | None,
    *,
    name: str | None = None,
    valid: Path | None = None,
    overrides: list[str] = (),
    lineage: str | None = "main",
    fresh: bool = False,
    again: bool = False,
    note: Note = quiet,
    config: tuple[Config, list[str]] | None = None,
    cwd: Path | None = None,
) -> Submission:
    """Validate the data and record the job as queued or rejected.

    ``path``: a JSONL file (``valid``: its validation file; without one every 20th example is held
    out), a folder of train.jsonl, valid.jsonl and test.jsonl (mlx-lm's layout: its splits as they
    are), a Hugging Face dataset name (local cache) or save_to_disk folder; None: the config's
    ``hf_dataset`` or ``data``. ``config``: the resolved config and its warnings (`ftctl lora`);
    default ftctl.yaml with ``overrides``. ``lineage`` None: a lineage of the job's own.

    The same data and validation data with the same resolved config as a job that is not rejected,
    cancelled or failed raises DuplicateSubmission unless ``again``.

    ``model`` may name a folder, a Hugging Face repo id (the job records the cached snapshot's
    folder and commit hash) or a GGUF file (imported into models/imported/ once, kept quantized).
    Submit refuses (SubmitError, nothing recorded) what would only fail at load: a model that cannot
    load, num_layers, LoRA keys or max_seq_length the model does not fit, a split smaller than a
    batch, an unusable resume_adapter_file, a foreign adapter_path, a tracker not installed.

    The data is never modified. An accepted job gets its own copy of it (and of its
    resume_adapter_file) under jobs/<id>/data/, so editing or deleting the original cannot change
    what a restart trains on.
    """
    cwd = Path(cwd or Path.cwd())
    overrides = list(overrides) + (["warm_start=false"] if fresh and config is None else [])
    cfg, warnings = config if config is not None else ws.load_config(overrides)
    warnings = list(warnings)
    if fresh and config is not None:
        cfg = msgspec.structs.replace(cfg, warm_start=False)
    if not cfg.train:
        raise SubmitError(
            "train: false: a job trains, and this config asks it not to. To score an adapter on a test "
            "split, run `ftctl lora --test --adapter-path DIR --data DIR` (or `ftctl eval JOB` for a job); "
            "nothing was queued"
        )
    cfg = _absolute(cfg, cwd)
    src = read_source(path, Path(valid) if valid is not None else None, cfg, cwd)
    f = features(cfg)
    report = validate_jsonl(src.train, f)
    vreport = validate_jsonl(src.valid, f) if src.valid is not None else None
    treport = validate_jsonl(src.test, f) if src.test is not None and cfg.test else None
    _check_train_mode(cfg, src, report, vreport)
    if cfg.test and src.test is None:
        raise SubmitError(
            f"test: true, but {src.path} has no test split: add test.jsonl to the folder (mlx-lm's layout), "
            "or set hf_dataset's test_split; nothing was queued"
        )
    name = name or (Path(src.path).stem if Path(src.path).suffix else Path(src.path).name)
    sha = hashlib.sha256(src.train).hexdigest()

    reasons = list(report.reasons) if report.verdict == "reject" else []
    for what, r in (("validation", vreport), ("test", treport)):
        if r is not None and r.verdict == "reject":
            reasons += [f"{what} file: {x}" for x in r.reasons]
    if src.valid is not None and not reasons:
        warnings += _check_valid(src, report, vreport)
    cfg, resolved = resolve_model(ws, ledger, cfg, note)
    if lineage is not None:  # what the job records, and what its sha256 hashes
        cfg = _lineage_config(ledger, lineage, cfg)
    problem = model_problem(ws.abs(cfg.model))
    if problem:  # the job would record this path for good: refuse it now, not at `ftctl start`
        raise SubmitError(f"the base model cannot load: {problem}", do=_MODEL_FIX)
    if cfg.reference_model_path is not None:
        problem = model_problem(cfg.reference_model_path)
        if problem:
            raise SubmitError(
                f"reference_model_path cannot load: {problem}",
                do="name an mlx-lm model folder, or leave it null to use the base model as the "
                "reference",
            )
    broken = group_problems(cfg)
    if broken:  # a data-parallel config that cannot launch: refuse it now, not at `ftctl start`
        raise SubmitError(
            f"the distributed config cannot run: {'; '.join(broken)}",
            do="fix `distributed` in ftctl.yaml (see docs/distributed.md) and submit again",
        )
    if src.valid is None and not src.folder:
        train, held = _split(src.train, report, cfg.batch_size)
    else:
        train, held = src.train, src.valid
    if not reasons:
        counts = {
            split: _examples(data, f)
            for split, data in (("train", train), ("valid", held), ("test", treport and src.test))
            if data
        }
        here = ws.located(cfg)  # the model's folder where it is now
        unfit = _fit(here, counts) or past_context(
            [
                (data, what)
                for data, what in (
                    (train, Path(src.path).name),
                    (held, f"validation file {_valid_name(src)}"),
                    (treport and src.test, "split 'test'"),
                )
                if data
            ],
            here,
            f,
            note,
        )
        if unfit:
            raise SubmitError(
                "this config does not fit its model or its data: "
                + "; ".join(unfit)
                + ". Nothing was queued; change those keys (ftctl.yaml, --set, or `ftctl lora`'s "
                "flags and -c file) and submit again"
            )
        # how long it trains (epochs) and what a full fine-tune takes, for this job's training data
        cfg, warnings = _how_long(cfg, warnings, counts["train"], held is not None, ws)
    if not reasons and not again:
        _duplicate(
            ledger,
            Path(src.path),
            sha,
            hashlib.sha256(src.valid).hexdigest() if src.valid is not None else None,
            cfg,
        )
    if not reasons:  # the config is resolved (the model's folder): count what max_seq_length cuts
        here = ws.located(cfg)  # the model's folder where it is now
        warnings += overlong(src.train, here, Path(src.path).name, f, note)
        if src.valid is not None:
            warnings += overlong(src.valid, here, f"validation file {_valid_name(src)}", f, note)

    for _ in range(10):  # job ids race only with a concurrent submit; the stream version decides
        job = _next_job_id(ledger)
        try:
            if reasons:
                ledger.commit(
                    job_stream(job),
                    ev.JobRejected(
                        job=job,
                        name=name,
                        data_path=ws.rel(src.path),
                        data_sha256=sha,
                        reasons=reasons,
                        problems=_problems(report)
                        + (_problems(vreport) if vreport else [])
                        + (_problems(treport) if treport else []),
                    ),
                )
                return Submission(
                    job, "rejected", report, vreport, warnings, reasons, treport, src.labels
                )
            jdir = ws.job_dir(job) / "data"
            if jdir.parent.exists():  # debris of a submit that died before its event: not a job
                shutil.rmtree(jdir.parent)
            jdir.mkdir(parents=True, mode=0o700)
            if held is None:
                warnings.append(
                    f"{src.path} has no validation split (valid.jsonl): training proceeds without "
                    "validation, as in mlx-lm"
                    if src.folder
                    else "no --valid file and too few examples to hold some out: "
                    "validation loss will not be computed for this job"
                )
            elif src.valid is None and not src.folder:
                n = held.count(b"\n")
                warnings.append(
                    f"no --valid file: held out {n} of {report.valid} examples for validation"
                )
            write_durable(jdir / "train.jsonl", train)
            copies = {"train.jsonl": hashlib.sha256(train).hexdigest()}
            if held is not None:
                write_durable(jdir / "valid.jsonl", held)
                copies["valid.jsonl"] = hashlib.sha256(held).hexdigest()
            if treport is not None:
                write_durable(jdir / "test.jsonl", src.test)
                copies["test.jsonl"] = hashlib.sha256(src.test).hexdigest()
            if cfg.resume_adapter_file is not None:
                weights = Path(cfg.resume_adapter_file).read_bytes()
                write_durable(jdir / RESUME_ADAPTER, weights)
                copies[RESUME_ADAPTER] = hashlib.sha256(weights).hexdigest()
            for what, r in (("", report), ("validation file: ", vreport), ("test file: ", treport)):
                if r is not None and r.verdict == "warn":
                    warnings += [what + x for x in r.reasons]
            ledger.commit(
                job_stream(job),
                ev.JobSubmitted(
                    job=job,
                    name=name,
                    data_path=ws.rel(src.path),
                    data_sha256=sha,
                    data_format=report.format or "",
                    examples=report.valid - report.undesirable,
                    train_examples=counts["train"],
                    valid_path=ws.rel(src.valid_path)
                    if src.valid_path
                    else (ws.rel(jdir / "valid.jsonl") if held is not None else None),
                    valid_sha256=hashlib.sha256(src.valid).hexdigest()
                    if src.valid is not None
                    else None,
                    config=job_config(cfg),
                    config_sha256=config_sha256(cfg),
                    lineage=lineage or f"{OWN_LINEAGE}{job}",
                    warnings=warnings,
                    overrides=overrides,
                    copies=copies,
                    model_repo=resolved.repo,
                    model_revision=resolved.revision,
                ),
            )
            return Submission(job, "queued", report, vreport, warnings, [], treport, src.labels)
        except ConcurrencyError:
            continue
    raise SubmitError(
        "could not allocate a job id: other submissions kept racing", do="submit it again"
    )
