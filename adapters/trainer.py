"""Deterministic, resumable fine-tuning (LoRA, DoRA or full), built from mlx-lm's pieces.

The loop is mlx-lm's (tuner/trainer.py): the same compiled step over
[model.state, optimizer.state, mx.random.state], default_loss, build_schedule,
linear_to_lora_layers, and what is trained is chosen as mlx-lm's lora.py chooses it, one branch per
fine-tune type (setup_model): LoRA/DoRA layers on the last num_layers layers, or for `full` those
layers themselves, unfrozen. Everything after works on model.trainable_parameters(), whichever they
are. What differs:
  - the batch at iteration n and the RNG key of global step g are pure functions
    of (seed, n) and (seed, g), so evaluation never perturbs training and a resume
    continues exactly where the checkpoint left off;
  - checkpoints carry the optimizer state and the data cursor, and are committed
    atomically (checkpoint.py), written on a background thread while the next steps run
    (at most one in flight; a stop, completion or failure waits for it);
  - progress goes to `emit` as the worker protocol's messages (protocol.py); the
    daemon journals them;
  - every evaluation is folded into the checkpointed state (core.early_stopping.watch): the best checkpoint
    is what `result: best` publishes, and early stopping decides the same way after a resume.
"""

import hashlib
import json
import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import msgspec
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.trainer import default_loss, grad_checkpoint
from mlx_lm.tuner.utils import build_schedule, linear_to_lora_layers
from mlx_lm.utils import load as load_model
from mlx_lm.utils import maybe_set_recommended_wired_limit

from ftctl.core.config import Config, RecordedConfigError, config_sha256, features
from ftctl.core.dataset import DEFAULT, Features, valid_records
from ftctl.core.early_stopping import watch
from ftctl.events.types import AdapterEvaluated, Metrics, PairStats

from . import blas, preference
from . import protocol as P
from .batches import TrainBatches, build_items, item_length, validation_batches
from .checkpoint import (
    ADAPTERS,
    MANIFEST,
    Checkpoint,
    CheckpointCorrupt,
    CheckpointWriter,
    TrainState,
    checkpoint_files,
    checkpoints_dir,
    export_adapter,
    load_checkpoint,
    nonfinite_tensors,
    publish_adapter,
    step_dir_name,
    verify_checkpoint,
)
from .evaluate import evaluate_loss, score
from .faults import crash_point, poison_marker, poison_scale
from .fs import FS
from .pacer import paced
from .protocol import TrainPlan
from .ranks import SINGLE, Ranks, join
from .telemetry import Telemetry

OPTIMIZERS = {
    "adam": optim.Adam,
    "adamw": optim.AdamW,
    "sgd": optim.SGD,
    "adafactor": optim.Adafactor,
    "muon": optim.Muon,
}
NAN_PATIENCE = 3
FULL_ON_QUANTIZED = (
    "fine_tune_type: full trains the model's weights themselves, but {model} is quantized: its "
    "weights cannot be trained. Use lora or dora (QLoRA: an adapter on the quantized weights), or a "
    "float copy of the model (`ftctl init --model FILE.gguf --dtype float16`, or mlx_lm.convert "
    "without -q)"
)


class TrainingDiverged(Exception):
    def __init__(self, category: str, step: int, global_step: int, message: str):
        self.category = category  # "inf" | "nan"
        self.step = step
        self.global_step = global_step
        super().__init__(message)


def step_seed(seed: int, global_step: int, rank: int = 0) -> int:
    """The RNG seed of a global step (of one rank of a data-parallel job): a pure function, so
    nothing needs saving."""
    key = f"ftctl-step:{seed}:{global_step}" + (f":{rank}" if rank else "")
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little")


def adapter_config(cfg: Config) -> dict:
    """adapter_config.json: what mlx_lm.load(model, adapter_path=...) reads (a full fine-tune has no
    lora_parameters: mlx-lm writes null)."""
    params = None
    if cfg.fine_tune_type != "full":
        lp = cfg.lora_parameters
        params = {"rank": lp.rank, "scale": lp.scale, "dropout": lp.dropout}
        if lp.keys is not None:
            params["keys"] = list(lp.keys)
    return {
        "model": cfg.model,
        "fine_tune_type": cfg.fine_tune_type,
        "num_layers": cfg.num_layers,
        "lora_parameters": params,
    }


def build_optimizer(cfg: Config) -> optim.Optimizer:
    if cfg.lr_schedule is not None:
        lr = build_schedule(msgspec.structs.asdict(cfg.lr_schedule))
    else:
        lr = cfg.learning_rate
    extra = cfg.optimizer_config.get(cfg.optimizer, {})
    return OPTIMIZERS[cfg.optimizer](learning_rate=lr, **extra)


def setup_model(cfg: Config):
    """Load the base model, freeze it, and make trainable what the fine-tune type trains, as mlx-lm's
    lora.py does: LoRA/DoRA layers (initialised from seed) on the last num_layers layers, or for
    `full` those layers' own weights."""
    model, tokenizer = load_model(
        cfg.model,
        tokenizer_config={"trust_remote_code": cfg.trust_remote_code},
        trust_remote_code=cfg.trust_remote_code,
    )
    if cfg.num_layers > len(model.layers):
        raise RecordedConfigError(
            f"num_layers = {cfg.num_layers} but the model {cfg.model} has only "
            f"{len(model.layers)} layers: lower num_layers or use -1 for all",
            "num_layers",
            len(model.layers),
        )
    mx.random.seed(cfg.seed)
    model.freeze()
    if cfg.fine_tune_type == "full":
        layers = model.layers[-max(cfg.num_layers, 0) :]
        if any(isinstance(m, nn.QuantizedLinear) for l in layers for _, m in l.named_modules()):
            raise ValueError(FULL_ON_QUANTIZED.format(model=cfg.model))
        for layer in layers:
            layer.unfreeze()
    else:
        lp = msgspec.structs.asdict(cfg.lora_parameters)
        if lp["keys"] is None:
            del lp["keys"]
        linear_to_lora_layers(model, cfg.num_layers, lp, use_dora=cfg.fine_tune_type == "dora")
    if cfg.grad_checkpoint:
        _grad_checkpoint_once(model.layers[0])
    return model, tokenizer


def load_items(path: str, tokenizer, mask_prompt: bool, feats: Features = DEFAULT, mode="sft"):
    """The file's items (batches.build_items), which must be what train_mode ``mode`` trains:
    examples for sft, preference pairs for dpo and orpo (submit checks it; a retry's --set may not)."""
    items = build_items(valid_records(Path(path).read_bytes(), feats), tokenizer, mask_prompt)
    pairs = bool(items) and not isinstance(items[0][1], int)
    if pairs != (mode != "sft"):
        raise ValueError(
            f"train_mode is {mode}, but {path} holds "
            + (
                "preference pairs: set train_mode dpo or orpo"
                if pairs
                else "SFT examples: set train_mode sft"
            )
        )
    return items


def train_loss(cfg: Config):
    """The loss the train mode differentiates, one branch per mode: mlx-lm's default_loss (sft) ->
    (loss, scored tokens), or preference.batch_loss (dpo, orpo) -> (loss, scored tokens, pair stats)."""
    if cfg.train_mode == "sft":
        return default_loss
    return preference.batch_loss(cfg.train_mode, cfg.beta, cfg.dpo_cpo_loss_type, cfg.delta)


def poisoned_examples(path: str, cfg: Config) -> frozenset[int]:
    """The fault seam FTCTL_POISON (faults.poison_marker): indices of the training examples holding its
    text. Empty (nothing read) when it is unset."""
    marker = poison_marker()
    if marker is None:
        return frozenset()
    records = valid_records(Path(path).read_bytes(), features(cfg))
    return frozenset(
        i for i, r in enumerate(records) if marker in json.dumps(r, ensure_ascii=False)
    )


@dataclass
class Session:
    """Everything training needs, loaded: the model with its adapter, the optimizer, the data,
    and the state to continue from (a resumed checkpoint's, or step 0)."""

    plan: TrainPlan
    model: nn.Module
    optimizer: optim.Optimizer
    batches: TrainBatches
    val: list | None
    adapter_config: dict
    state: TrainState
    last_ckpt: str | None = None
    last_state: TrainState | None = (
        None  # the state of the newest checkpoint (the one resumed from)
    )
    poisoned: frozenset[int] = frozenset()  # the FTCTL_POISON seam's examples (tests only)
    ranks: Ranks = SINGLE
    loss: Callable = default_loss  # train_loss(config)
    reference: Callable | None = (
        None  # DPO: the reference log-probs of a batch (preference.reference)
    )
    blas_threads: int | None = None  # the OpenBLAS threads it trains on (None: a BLAS without)

    def inputs(self, batch: tuple) -> tuple:
        """What the loss takes for a batch: the batch, and for DPO its reference log-probs."""
        return batch if self.reference is None else (*batch, self.reference(*batch))


def load(plan: TrainPlan) -> Session:
    """Load the model, data and optimizer; restore the resume checkpoint or the warm start."""
    cfg = plan.config
    ranks = join(plan)  # a data-parallel job: blocks until every rank is up
    maybe_set_recommended_wired_limit()
    model, tokenizer = setup_model(cfg)
    batches = TrainBatches(
        load_items(plan.train_path, tokenizer, cfg.mask_prompt, features(cfg), cfg.train_mode),
        cfg.batch_size,
        cfg.max_seq_length,
        cfg.seed,
    )
    val = None
    if plan.valid_path:
        val_items = load_items(
            plan.valid_path, tokenizer, cfg.mask_prompt, features(cfg), cfg.train_mode
        )
        val = validation_batches(val_items, cfg.batch_size, cfg.max_seq_length, cfg.val_batches)
        if not val:
            raise RecordedConfigError(
                f"the validation set has {len(val_items)} examples, fewer than "
                f"batch_size = {cfg.batch_size}: add validation data or lower batch_size",
                "batch_size",
                max(1, len(val_items)),
            )
    optimizer = build_optimizer(cfg)
    optimizer.init(model.trainable_parameters())
    s = Session(
        plan,
        model,
        optimizer,
        batches,
        val,
        adapter_config(cfg),
        state=None,
        poisoned=poisoned_examples(plan.train_path, cfg),
        ranks=ranks,
        loss=train_loss(cfg),
        # before any trained weights are restored: `full` keeps the base weights of its layers
        reference=preference.reference(cfg, model, lambda path: load_model(path)),
    )
    if plan.resume_from:
        ck = load_checkpoint(plan.resume_from)
        _check_resume(plan, ck, s.adapter_config)
        _restore_weights(model, ck.adapters, plan.resume_from)
        _restore_optimizer(optimizer, ck.optimizer, plan.resume_from, skip=())
        s.state, s.last_ckpt, s.last_state = ck.state, str(plan.resume_from), ck.state
    else:
        if (
            plan.resume_adapter_file
        ):  # mlx-lm's --resume-adapter-file: these weights, a fresh optimizer
            _restore_weights(model, mx.load(plan.resume_adapter_file), plan.resume_adapter_file)
        elif plan.warm_start_from:
            ck = load_checkpoint(plan.warm_start_from)
            _check_compatible(ck.adapter_config, s.adapter_config, plan.warm_start_from)
            _restore_weights(model, ck.adapters, plan.warm_start_from)
            # moments only: the step (and so the LR schedule) restarts with this job
            _restore_optimizer(
                optimizer, ck.optimizer, plan.warm_start_from, skip=("step", "learning_rate")
            )
        s.state = TrainState(
            job_step=0,
            global_step=plan.global_step_base,
            cursor=batches.cursor(0),
            seed=cfg.seed,
            config_sha256=config_sha256(cfg),
            world_size=ranks.size,
        )
    mx.eval(model.parameters(), optimizer.state)
    return s


def run(
    plan: TrainPlan,
    emit: Callable[[P.Message], None],
    stop_requested: Callable[[], bool] = lambda: False,
    fs: FS | None = None,
) -> P.Completed | P.Stopped:
    """Train plan.config.iters iterations (resuming or warm-starting as planned).

    Emits the worker protocol's messages and returns the last one (Completed or Stopped); a rank of a
    data-parallel job other than the leader (ranks.py) ends with Finished and returns None when done.
    Raises TrainingDiverged, OSError (disk), ValueError (unusable plan or data),
    CheckpointCorrupt (resume/warm-start source fails verification).
    """
    fs = fs or FS()
    tic = time.perf_counter()
    s = load(plan)
    crash_point("while_loading", s.state.job_step)
    load_s = time.perf_counter() - tic
    cfg = plan.config
    lengths = sorted(item_length(i) for i in s.batches.items)
    threads, ms, others = blas.settle_threads(
        plan.blas_threads,
        s.model,
        cfg.batch_size // plan.world_size * min(cfg.max_seq_length, lengths[len(lengths) // 2]),
        cfg.fine_tune_type == "full",
    )
    s.blas_threads = threads
    emit(
        P.Loaded(
            step=s.state.job_step,
            global_step=s.state.global_step,
            load_s=load_s,
            blas_threads=threads,
            blas_ms=ms,
            blas_others=others,
        )
    )
    if s.state.job_step < plan.config.iters and s.state.stopped_early is None:
        stopped = _Loop(s, emit, fs).run(stop_requested)
        if stopped is not None:
            return stopped
    early = s.last_state is not None and s.last_state.stopped_early is not None
    # a reproduction's window ends
    if plan.until_step is not None and plan.until_step < plan.config.iters and not early:
        done = P.Stopped(
            step=plan.until_step,
            global_step=plan.global_step_base + plan.until_step,
            checkpoint=s.last_ckpt,
        )
        emit(done)
        return done
    if not s.ranks.leader:
        s.ranks.barrier()  # the leader has written the last checkpoint
        emit(P.Finished(step=s.last_state.job_step if early else plan.config.iters))
        return None
    s.ranks.barrier()
    return _complete(s, emit, fs)


def _poisoned(loss):
    """``loss`` times its last argument (1.0, or on a poisoned batch NaN or FTCTL_POISON_SCALE): the
    FTCTL_POISON seam."""

    def poisoned(model, *inputs):
        lvalue, *rest = loss(model, *inputs[:-1])
        return (lvalue * inputs[-1], *rest)

    return poisoned


def _compiled_step(s: Session):
    """mlx-lm's compiled step over [model.state, optimizer.state, mx.random.state], with gradient
    accumulation and clipping, returning (loss, tokens, gradient, pair stats — None for sft). A traced
    run (plan.trace) also returns each gradient array's squared norm, before accumulation and
    clipping, in tree_flatten order."""
    model, optimizer, cfg = s.model, s.optimizer, s.plan.config
    loss_value_and_grad = nn.value_and_grad(model, _poisoned(s.loss) if s.poisoned else s.loss)
    accum, clip, trace = cfg.grad_accumulation_steps, cfg.max_grad_norm, s.plan.trace
    state = [model.state, optimizer.state, mx.random.state]
    ranks = s.ranks

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, prev_grad, do_update, stop=None):
        (lvalue, toks, *stats), grad = loss_value_and_grad(model, *batch)
        norms = (
            mx.stack([mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(grad)])
            if trace
            else None
        )
        # the global batch's loss, tokens, gradient and pair stats, and the stop requests (ranks.py):
        # a preference loss is a mean over the rank's pairs, SFT's over its scored tokens
        if ranks.many:
            local = toks
            pairs = mx.array(batch[0].shape[0] // 2) if stats else None
            lvalue, toks, grad, stops, mean = ranks.reduce_step(
                lvalue, toks, grad, stop, pairs, stats[0] if stats else None
            )
            stats = [mean] if stats else stats
        if prev_grad is not None:
            grad = tree_map(lambda x, y: x + y, grad, prev_grad)
        if do_update:
            if accum > 1:
                grad = tree_map(lambda x: x / accum, grad)
            if clip is not None:
                grad, _ = optim.clip_grad_norm(grad, clip)
            optimizer.update(model, grad)
            grad = None
        out = (lvalue, toks, grad, stats[0] if stats else None) + ((norms,) if trace else ())
        return out + (local, stops) if ranks.many else out

    return step, state


class _Loop:
    """The training loop and its running counters (report window, loss since the last checkpoint)."""

    def __init__(self, s: Session, emit, fs: FS):
        self.s, self.emit, self.fs, self.cfg = s, emit, fs, s.plan.config
        st = s.state
        self.eval_count, self.trained_tokens = st.eval_count, st.trained_tokens
        self.train_loss, self.val_loss = st.train_loss, st.val_loss
        self.val_step, self.watch, self.stopped_early = st.val_step, st.watch, st.stopped_early
        self.w_loss = self.w_tokens = self.w_steps = self.w_local = 0  # report window
        self.w_stats = None  # preference training: the window's summed pair stats
        self.w_time = 0.0
        # of the window, the steps that compiled (mx.compile traces and compiles the step again for
        # each new input shape or constant argument): tokens/s leaves them out — a one-off compile
        # (a second for the demo model under load, far more for a big one) is no training speed
        self.k_tokens = self.k_local = 0
        self.k_time = 0.0
        self.compiled: set[tuple] = set()
        self.c_loss = self.c_steps = 0  # since the last checkpoint
        self.nan_run = 0
        self.writer = CheckpointWriter(s.plan.job_dir, fs, self._written)
        self.telemetry = Telemetry()  # the device and its readings, one sample per report
        self.proc_steps = 0  # steps this process has run (the telemetry seam's per-step growth)
        # a traced run names each gradient array's group: its path without lora_a / lora_b
        self.groups = (
            [k.rpartition(".")[0] for k, _ in tree_flatten(s.model.trainable_parameters())]
            if s.plan.trace
            else []
        )

    def run(self, stop_requested) -> P.Stopped | None:
        """train(), and whatever way it ends, never before the checkpoint in flight is written (or has
        failed): a stop or completion reports it, a failure exits with the write's own error when
        training itself did not fail first."""
        ranks = self.s.ranks
        try:
            # how a busy Linux machine schedules it: adapters/pacer.py
            with paced(mx.default_device() == mx.cpu, self.s.blas_threads):
                stopped = self.train(stop_requested)
        except BaseException:
            late = self.writer.drain()
            if late is not None:
                print(
                    f"the checkpoint in flight failed too: {type(late).__name__}: {late}",
                    flush=True,
                )
            raise
        finally:
            self.writer.close()
        self.writer.wait()
        if stopped is not None:
            ranks.barrier()  # the leader's stop checkpoint is written
            if not ranks.leader:
                self.emit(P.Finished(step=stopped.step))
                return stopped
            stopped = P.Stopped(
                step=stopped.step, global_step=stopped.global_step, checkpoint=self.s.last_ckpt
            )
            self.emit(stopped)
        return stopped

    def _written(self, record) -> None:
        """On the writer thread, right after the rename: the checkpoint is durable; report it."""
        self.s.last_ckpt = record.path
        self.emit(P.CheckpointWritten(checkpoint=record))

    def train(self, stop_requested) -> P.Stopped | None:
        s, cfg = self.s, self.cfg
        step, state = _compiled_step(s)
        accum, grad, stopping = cfg.grad_accumulation_steps, None, False
        if s.val is not None and s.state.job_step == 0 and not s.plan.resume_from:
            # the starting point (the base model, or the warm start): what training has to beat. Only
            # reported: checkpoints keep evaluations of trained weights (retention's keep_best)
            self._evaluate(0, s.plan.global_step_base)
        s.model.train()
        last = cfg.iters if s.plan.until_step is None else min(cfg.iters, s.plan.until_step)
        for it in range(s.state.job_step + 1, last + 1):
            gstep = s.plan.global_step_base + it
            t0 = time.perf_counter()
            mx.random.seed(step_seed(cfg.seed, gstep, s.ranks.rank))
            batch = s.inputs(
                s.batches.batch(it - 1, s.ranks.rank, s.ranks.size)
                if s.ranks.many
                else s.batches.batch(it - 1)
            )
            if s.poisoned:
                hit = not s.poisoned.isdisjoint(s.batches.indices(it - 1))
                batch = (*batch, mx.array(poison_scale() if hit else 1.0))
            key = (tuple(batch[0].shape), it % accum == 0, grad is None)
            compiles = key not in self.compiled
            self.compiled.add(key)
            # every rank stops at the same step: the first where any of them was asked to
            if s.ranks.many:
                *out, local, stops = step(
                    batch, grad, it % accum == 0, mx.array(float(stop_requested()))
                )
                mx.eval(state, out, local, stops)
                self.w_local += local.item()
                self.k_local += local.item() if compiles else 0
                asked = stops.item() > 0
            else:
                out = step(batch, grad, it % accum == 0)
                mx.eval(state, out)
            if mx.get_cache_memory() > cfg.clear_cache_threshold:  # as mlx-lm's _clear_cache
                mx.clear_cache()
            lvalue, toks, grad, stats, *norms = out
            took = time.perf_counter() - t0
            self.w_time += took
            if compiles:
                self.k_time += took
                self.k_tokens += toks.item()
            self.writer.check()  # a failed background write stops training at once, with its error
            if s.plan.trace:
                self._trace(it, gstep, lvalue.item(), toks.item(), norms[0])
            self._account(it, gstep, lvalue.item(), toks.item(), stats)
            self.proc_steps += 1
            self.emit(P.Step(step=it, global_step=gstep))
            crash_point("mid_step", gstep)
            if it % cfg.steps_per_report == 0 or it == cfg.iters:
                self._report(it, gstep)
            boundary = it % accum == 0 or it == cfg.iters
            stopping = stopping or (asked if s.ranks.many else stop_requested())
            best = False
            if s.val is not None and (it % cfg.steps_per_eval == 0 or it == cfg.iters):
                self.val_loss, self.val_step = self._evaluate(it, gstep), it
                self.eval_count += 1
                self.watch, best, self.stopped_early = watch(
                    self.watch, it, self.val_loss, cfg.early_stopping
                )
            if (
                it % cfg.save_every == 0
                or it == cfg.iters
                or (stopping and boundary)
                or (best and cfg.result == "best")  # the best weights are kept to be published
                or self.stopped_early  # evaluation steps are update boundaries
            ):
                self._checkpoint(it, gstep)
            if self.stopped_early:
                return None  # run() completes the job from this step's checkpoint
            if stopping and boundary and it < cfg.iters:
                # run() emits it once written
                return P.Stopped(step=it, global_step=gstep, checkpoint=None)
        return None

    def _account(self, it: int, gstep: int, loss: float, ntoks: int, stats=None) -> None:
        """Count the step's loss and tokens; stop at an infinite loss or NAN_PATIENCE NaNs in a row."""
        if math.isinf(loss) or (math.isnan(loss) and self.nan_run + 1 >= NAN_PATIENCE):
            # let the checkpoint in flight land first; if it found its weights not finite, that is
            # the earlier divergence, and the one to report
            late = self.writer.drain()
            if isinstance(late, TrainingDiverged):
                raise late
        if math.isinf(loss):
            raise TrainingDiverged(
                "inf",
                it,
                gstep,
                _diverged_text(self.cfg, it, gstep, "became infinite", self.s.last_ckpt),
            )
        self.nan_run = self.nan_run + 1 if math.isnan(loss) else 0
        if self.nan_run >= NAN_PATIENCE:
            raise TrainingDiverged(
                "nan",
                it,
                gstep,
                _diverged_text(
                    self.cfg, it, gstep, f"was NaN {self.nan_run} steps in a row", self.s.last_ckpt
                ),
            )
        self.w_loss += loss
        if stats is not None:
            self.w_stats = stats if self.w_stats is None else self.w_stats + stats
        self.w_tokens += ntoks
        self.w_steps += 1
        self.c_loss += loss
        self.c_steps += 1
        self.trained_tokens += ntoks

    def _trace(self, it: int, gstep: int, loss: float, ntoks: int, norms) -> None:
        """A traced run's record of the step, sent before its loss is checked."""
        s = self.s
        sq = norms.tolist()
        bad = list(dict.fromkeys(g for g, x in zip(self.groups, sq) if not math.isfinite(x)))
        examples = s.batches.indices(it - 1)
        self.emit(
            P.Traced(
                step=it,
                global_step=gstep,
                loss=_wire(loss),
                grad_norm=_wire(math.sqrt(sum(sq))),
                lr=_wire(s.optimizer.learning_rate.item()),
                tokens=ntoks,
                examples=list(examples),
                lengths=[item_length(s.batches.items[i]) for i in examples],
                nonfinite_groups=bad,
                group_count=len(dict.fromkeys(self.groups)),
            )
        )

    def _report(self, it: int, gstep: int) -> None:
        steady = self.w_time - self.k_time  # the steps that did not compile

        def rate(n: float, compiled: float) -> float:
            if steady > 1e-9:
                return (n - compiled) / steady
            return n / self.w_time if self.w_time > 0 else 0.0  # every step compiled: all there is

        self.emit(
            P.Report(
                metrics=Metrics(
                    step=it,
                    global_step=gstep,
                    loss=_finite(self.w_loss / self.w_steps),
                    lr=_finite(self.s.optimizer.learning_rate.item()),
                    tokens_per_s=rate(self.w_tokens, self.k_tokens),
                    peak_mem_gb=mx.get_peak_memory() / 1e9,
                    trained_tokens=self.trained_tokens,
                    **_pair_fields(self.w_stats, self.w_steps),
                    device=self.telemetry.device.label(),
                    **self.telemetry.read(self.proc_steps),
                ),
                local_tokens_per_s=rate(self.w_local, self.k_local) if self.s.ranks.many else None,
            )
        )
        self.w_loss = self.w_tokens = self.w_steps = self.w_local = 0
        self.w_stats = None
        self.w_time = 0.0
        self.k_tokens = self.k_local = 0
        self.k_time = 0.0

    def _evaluate(self, it: int, gstep: int) -> float | None:
        self.emit(P.EvalStarted(step=it))
        t0 = time.perf_counter()
        s = self.s
        value, _, stats = evaluate_loss(s.model, s.val, s.ranks, s.loss, s.inputs)
        loss, pairs = _finite(value), _pair_fields(stats, 1)
        self.emit(
            P.Evaluated(
                step=it,
                global_step=gstep,
                val_loss=loss,
                eval_s=time.perf_counter() - t0,
                preference=PairStats(**pairs) if pairs else None,
            )
        )
        return loss

    def _checkpoint(self, it: int, gstep: int) -> None:
        """Never checkpoint a non-finite state; otherwise hand it to the background writer, which
        checks the adapter weights are finite, reports the start, writes atomically and reports it."""
        s, cfg = self.s, self.cfg
        if self.nan_run:
            late = self.writer.drain()
            if isinstance(late, TrainingDiverged):
                raise late
            raise TrainingDiverged(
                "nan",
                it,
                gstep,
                _diverged_text(
                    cfg,
                    it,
                    gstep,
                    "or the trained weights are not finite at a checkpoint",
                    s.last_ckpt,
                ),
            )
        if self.c_steps:
            self.train_loss = self.c_loss / self.c_steps
        self.c_loss = self.c_steps = 0
        state = s.last_state = TrainState(
            job_step=it,
            global_step=gstep,
            cursor=s.batches.cursor(it),
            seed=cfg.seed,
            eval_count=self.eval_count,
            trained_tokens=self.trained_tokens,
            train_loss=self.train_loss,
            val_loss=self.val_loss,
            config_sha256=s.state.config_sha256,
            world_size=s.ranks.size,
            val_step=self.val_step,
            watch=self.watch,
            stopped_early=self.stopped_early,
        )
        # the leader writes it; no rank runs past a checkpoint before it is handed over
        if not s.ranks.leader:
            s.ranks.barrier()
            return
        # At most one checkpoint in flight: the previous one must be written (and reported) before
        # this one starts, so the daemon commits them in order.
        t0 = time.perf_counter()
        self.writer.wait()
        waited = time.perf_counter() - t0
        if waited >= 0.001:
            print(
                f"checkpoint step {it}: waited {waited:.3f} s for the previous checkpoint's write",
                flush=True,
            )
        # The step-`it` arrays, evaluated (the loop's mx.eval): immutable, and the next steps make new
        # ones (the compiled step's outputs replace model.state and optimizer.state; holding these
        # references also keeps MLX from donating their buffers). Only the writing is on the thread.
        files = checkpoint_files(
            Checkpoint(
                adapters=dict(tree_flatten(s.model.trainable_parameters())),
                adapter_config=s.adapter_config,
                optimizer=dict(tree_flatten(s.optimizer.state)),
                state=state,
            )
        )
        started = P.CheckpointStarted(step=it, global_step=gstep, waited_s=round(waited, 6))

        def finite(
            buffers: dict,
        ) -> None:  # beside the write: numpy bit tests of the buffers, off the loop
            if nonfinite_tensors(buffers[ADAPTERS]):
                raise TrainingDiverged(
                    "nan",
                    it,
                    gstep,
                    _diverged_text(
                        cfg,
                        it,
                        gstep,
                        "or the trained weights are not finite at a checkpoint",
                        s.last_ckpt,
                    ),
                )
            self.emit(started)

        self.writer.submit(files, state, check=finite)
        s.ranks.barrier()


def _complete(s: Session, emit, fs: FS) -> P.Completed:
    """Publish the job's result (config ``result``: the best checkpoint by validation loss, or the
    last) as jobs/<id>/adapters and at the config's adapter_path, score the test split when the
    config asks (`test`), then report: all of it before Completed, so a worker killed on the way
    redoes it from the final checkpoint. The best one is a committed checkpoint of this job
    (retention never prunes it); if it no longer verifies, the last one is published and the
    completion says why."""
    plan, cfg, final = s.plan, s.plan.config, s.last_state
    w, src, result, note = final.watch, s.last_ckpt, "last", ""
    step, val = final.job_step, final.val_loss if final.val_step == final.job_step else None
    if cfg.result == "best" and w.best_step is None:
        note = "result: best, but no validation loss was measured: the last step's adapter"
    elif cfg.result == "best":
        result = "best"
        if w.best_step != final.job_step:
            best = checkpoints_dir(plan.job_dir) / step_dir_name(w.best_step)
            try:
                verify_checkpoint(best)
                src, step, val = str(best), w.best_step, w.best_val_loss
            except CheckpointCorrupt as e:
                result = "last"
                note = (
                    f"result: best, but the best checkpoint (step {w.best_step}) is unusable "
                    f"({e.reason}): the last step's adapter"
                )
                print(note, flush=True)
    adapter_dir, sha = publish_adapter(plan.job_dir, src, fs)
    exported = refused = None
    if cfg.adapter_path is not None:
        try:
            exported = str(export_adapter(adapter_dir, cfg.adapter_path, fs))
        except ValueError as e:  # a folder ftctl did not write appeared there since submit
            refused = str(e)
            print(f"adapter_path: {refused}: the adapter stays in {adapter_dir}", flush=True)
    evaluated = _test(s, emit, adapter_dir, sha) if plan.test_path else None
    msg = P.Completed(
        step=final.job_step,
        global_step=final.global_step,
        adapter_path=str(adapter_dir),
        adapter_sha256=sha,
        checkpoint=src,
        result=result,
        result_step=step,
        result_val_loss=val,
        result_note=note,
        stopped_early=final.stopped_early,
        best_step=w.best_step,
        best_val_loss=w.best_val_loss,
        exported_to=exported,
        export_refused=refused,
        evaluated=evaluated,
    )
    emit(msg)
    return msg


def _test(s: Session, emit, adapter_dir: Path, sha: str) -> AdapterEvaluated:
    """mlx-lm's --test: the trained adapter (and, as `ftctl eval` does, the base model) scored on
    the test split, test_batches full batches (-1: all)."""
    plan, cfg = s.plan, s.plan.config
    emit(P.EvalStarted(step=cfg.iters))  # the watchdog allows eval_hang_s meanwhile
    data = Path(plan.test_path).read_bytes()
    r = score(
        cfg.model,
        str(adapter_dir),
        data,
        batch_size=cfg.batch_size,
        max_seq_length=cfg.max_seq_length,
        mask_prompt=cfg.mask_prompt,
        features=features(cfg),
        num_batches=cfg.test_batches,
        trust_remote_code=cfg.trust_remote_code,
        beta=cfg.beta,
    )
    return AdapterEvaluated(
        job=plan.job_id,
        data_path=plan.test_path,
        data_sha256=hashlib.sha256(data).hexdigest(),
        examples=r.examples,
        tokens=r.tokens,
        base_model=cfg.model,
        adapter_path=str(adapter_dir),
        adapter_sha256=sha,
        base_loss=r.base_loss,
        base_ppl=r.base_ppl,
        adapter_loss=r.adapter_loss,
        adapter_ppl=r.adapter_ppl,
        preference=r.pairs,
    )


def _pair_fields(stats: mx.array | None, n: int) -> dict:
    """Metrics' preference fields (preference.STATS) from summed pair stats over ``n`` steps; {} for sft."""
    if stats is None or n == 0:
        return {}
    return {k: _finite(v / n) for k, v in zip(preference.STATS, stats.tolist())}


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _wire(x: float) -> float | str:
    """A float for a JSON message: JSON has no NaN or infinity, so those travel as text."""
    return x if math.isfinite(x) else str(x)


def _diverged_text(cfg: Config, step: int, gstep: int, what: str, last_ckpt) -> str:
    lr = cfg.lr_schedule.arguments[0] if cfg.lr_schedule else cfg.learning_rate
    kept = (
        f"The last good checkpoint is kept: {last_ckpt}."
        if last_ckpt
        else "No checkpoint of this job was written yet."
    )
    return (
        f"Training diverged at step {step} (global step {gstep}): the loss {what}. "
        f"Nothing after that point was saved. {kept} "
        f"What to do: lower the learning rate (now {lr:g}; try {lr / 10:g}), "
        + (
            "clip gradients (set max_grad_norm, e.g. 1.0), "
            if cfg.max_grad_norm is None
            else f"clip gradients harder (max_grad_norm is {cfg.max_grad_norm:g}), "
        )
        + "add or lengthen warmup (lr_schedule.warmup) to tame early gradient spikes, and check the "
        "data for broken, empty or extremely long examples; then retry the job."
    )


def _grad_checkpoint_once(layer) -> None:
    # mlx-lm patches the layer *class*; patch it once per process, not once per run.
    cls = type(layer)
    if not getattr(cls, "_ftctl_grad_checkpoint", False):
        grad_checkpoint(layer)
        cls._ftctl_grad_checkpoint = True


def _check_resume(plan: TrainPlan, ck: Checkpoint, a_config: dict) -> None:
    st, cfg, src = ck.state, plan.config, plan.resume_from
    if Path(src).resolve().parent != checkpoints_dir(plan.job_dir).resolve():
        raise ValueError(f"resume_from {src} is not a checkpoint of job {plan.job_id}")
    if plan.resume_manifest_sha256:  # every rank of a data-parallel job loads this very checkpoint
        found = hashlib.sha256((Path(src) / MANIFEST).read_bytes()).hexdigest()
        if found != plan.resume_manifest_sha256:
            raise CheckpointCorrupt(
                src,
                f"its manifest hashes to {found[:16]}… on this host, not to the committed "
                f"{plan.resume_manifest_sha256[:16]}… (another copy, or changed since)",
            )
    if st.world_size != plan.world_size and not plan.reshard:
        raise ValueError(
            f"checkpoint {src} was trained on {st.world_size} rank(s), this attempt runs "
            f"{plan.world_size}: resuming on another world size needs `ftctl retry {plan.job_id} --reshard`"
        )
    if st.seed != cfg.seed:
        raise ValueError(f"checkpoint {src} was trained with seed {st.seed}, not {cfg.seed}")
    if st.job_step > cfg.iters:
        raise ValueError(f"checkpoint {src} is at step {st.job_step}, past iters = {cfg.iters}")
    if st.global_step != plan.global_step_base + st.job_step:
        raise ValueError(
            f"checkpoint {src} is at global step {st.global_step}, but the plan puts its "
            f"step {st.job_step} at {plan.global_step_base + st.job_step}"
        )
    _check_compatible(ck.adapter_config, a_config, src)


def _check_compatible(found: dict, want: dict, src) -> None:
    keys = ("fine_tune_type", "num_layers", "lora_parameters")
    diff = [k for k in keys if found.get(k) != want.get(k)]
    if diff:
        shown = ", ".join(f"{k}: {found.get(k)!r} there, {want.get(k)!r} here" for k in diff)
        raise ValueError(f"the adapter in {src} does not match this job's config ({shown})")


def _restore_weights(model, weights: dict, src) -> None:
    want = dict(tree_flatten(model.trainable_parameters()))
    _check_tree(want, weights, src, "trained weights")
    model.load_weights(list(weights.items()), strict=False)


def _restore_optimizer(optimizer, flat: dict, src, skip: tuple) -> None:
    """Load saved optimizer values into the initialised state, in place (the compiled
    step holds a reference to optimizer.state)."""
    want = {k: v for k, v in tree_flatten(optimizer.state) if k not in skip}
    got = {k: v for k, v in flat.items() if k not in skip}
    _check_tree(want, got, src, "optimizer state")
    for key, value in got.items():
        *path, last = key.split(".")
        node = optimizer.state
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value


def _check_tree(want: dict, got: dict, src, what: str) -> None:
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    wrong = sorted(k for k in set(want) & set(got) if want[k].shape != got[k].shape)
    if missing or extra or wrong:
        parts = []
        for label, names in (("missing", missing), ("unexpected", extra), ("wrong shape", wrong)):
            if names:
                more = " ..." if len(names) > 3 else ""
                parts.append(f"{label}: {', '.join(names[:3])}{more}")
        raise ValueError(
            f"the {what} in {src} do not fit this model and config ({'; '.join(parts)}); "
            "was it written with a different model, rank, num_layers or optimizer?"
        )
