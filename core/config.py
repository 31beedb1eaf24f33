"""The ftctl.yaml schema: msgspec Structs, decoding with one-line errors, warnings, overrides.

Pure: no file I/O. The caller reads the YAML file and hands its mapping to `decode_config`.
Keys follow mlx-lm's lora config where they exist; ftctl's own keys come after them.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct, field
from msgspec import inspect as mi

from . import config_errors as E
from .config_errors import ConfigError
from .dataset import Features

__all__ = [
    "Alerts",
    "Config",
    "ConfigError",
    "Consolidation",
    "NotifyTarget",
    "Power",
    "Distributed",
    "HFDataset",
    "LoraParameters",
    "LRSchedule",
    "RestartPolicy",
    "Retention",
    "Timeouts",
    "EarlyStopping",
    "config_sha256",
    "config_warnings",
    "batches_per_epoch",
    "epoch_of",
    "epochs_trained",
    "keep_last",
    "resolve_epochs",
    "config_to_dict",
    "job_config",
    "decode_config",
    "default_config_dict",
    "describe_keys",
    "features",
    "hf_entries",
    "MLX_LM_DEFAULTS",
    "MLX_LM_LORA_DEFAULTS",
    "merge_overrides",
    "override_key",
    "world_size",
    "blame_override",
]


def _m(description: str, allowed: str | None = None, **constraints) -> Meta:
    """Meta with a help line and, where the constraint needs words, the allowed-values text."""
    extra = {"allowed": allowed} if allowed else None
    return Meta(description=description, extra=extra, **constraints)


# mlx.optimizers.schedulers that mlx_lm.tuner.utils.build_schedule can call with positional
# `arguments` (join_schedules takes lists, so it cannot come from a config file).
# name -> (signature, min args, max args, indices of step-count arguments)
SCHEDULES: dict[str, tuple[str, int, int, tuple[int, ...]]] = {
    "cosine_decay": ("init, decay_steps[, end]", 2, 3, (1,)),
    "exponential_decay": ("init, decay_rate", 2, 2, ()),
    "linear_schedule": ("init, end, steps", 3, 3, (2,)),
    "step_decay": ("init, decay_rate, step_size", 3, 3, (2,)),
}
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor", "muon")


class LoraParameters(Struct, kw_only=True, forbid_unknown_fields=True):
    rank: Annotated[int, _m("LoRA rank: inner size of the low-rank update", ge=1, le=1024)] = 8
    scale: Annotated[float, _m("LoRA scale: multiplier of the low-rank update", gt=0)] = 20.0
    dropout: Annotated[float, _m("dropout on the LoRA input during training", ge=0, lt=1)] = 0.0
    keys: Annotated[
        Annotated[list[str], Meta(min_length=1)] | None,
        _m(
            "module names to adapt, e.g. [self_attn.q_proj, self_attn.v_proj]; null = mlx-lm's "
            "default for the architecture",
            "a non-empty list of module names, or null",
        ),
    ] = None


class LRSchedule(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[
        Literal["cosine_decay", "exponential_decay", "linear_schedule", "step_decay"],
        _m("mlx.optimizers scheduler, called as name(*arguments)"),
    ]
    warmup: Annotated[int, _m("linear warmup steps before the schedule starts", ge=0)] = 0
    warmup_init: Annotated[float, _m("learning rate at the first warmup step", ge=0)] = 0.0
    arguments: Annotated[
        list[float | int],
        _m(
            "positional arguments of the scheduler; the first is the initial learning rate",
            "a list of numbers matching the scheduler, e.g. cosine_decay: [init, decay_steps, end]",
        ),
    ] = []


# retention.keep_last when it is null: a full fine-tune's checkpoint holds the trained weights and their
# optimizer state (Adam: 3x the trained weights: GBs for a real model), a LoRA one a few MB
KEEP_LAST = {"lora": 3, "dora": 3, "full": 1}


class Retention(Struct, kw_only=True, forbid_unknown_fields=True):
    keep_last: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        _m(
            "number of most recent checkpoints kept on disk; null = by fine_tune_type: 3 for lora and "
            "dora, 1 for full (a full checkpoint holds the trained weights and their optimizer state: "
            "GBs for a real model)",
            "an integer >= 1, or null",
        ),
    ] = None
    keep_best: Annotated[
        bool,
        _m("also keep the checkpoint with the lowest val_loss (measured at its own step)"),
    ] = True


class EarlyStopping(Struct, kw_only=True, forbid_unknown_fields=True):
    patience: Annotated[
        int,
        _m(
            "evaluations in a row that do not lower the best validation loss by at least min_delta "
            "before training stops",
            ge=1,
        ),
    ] = 3
    min_delta: Annotated[
        float,
        _m("the smallest decrease of the validation loss that counts as an improvement", ge=0),
    ] = 0.0


class RestartPolicy(Struct, kw_only=True, forbid_unknown_fields=True):
    max_restarts: Annotated[
        int, _m("automatic restarts of a crashed job allowed within window_s", ge=0)
    ] = 3
    window_s: Annotated[float, _m("seconds over which restarts are counted", gt=0)] = 300.0
    backoff_s: Annotated[
        float,
        _m(
            "wait before the second restart within window_s (the first is at once), doubled each time after",
            ge=0,
        ),
    ] = 2.0
    backoff_max_s: Annotated[float, _m("longest wait between restarts", ge=0)] = 60.0


class Timeouts(Struct, kw_only=True, forbid_unknown_fields=True):
    hang_s: Annotated[
        float, _m("seconds without a training step before the job counts as hung", gt=0)
    ] = 300.0
    eval_hang_s: Annotated[
        float, _m("seconds without progress allowed during validation (>= hang_s)", gt=0)
    ] = 1800.0
    stop_s: Annotated[
        float, _m("seconds a stop request waits for a clean exit before killing", gt=0)
    ] = 120.0


class Guards(Struct, kw_only=True, forbid_unknown_fields=True):
    max_temperature_c: Annotated[
        float,
        _m(
            "the GPU's temperature limit (NVML, °C): `ftctl doctor` flags a device above it, and a training "
            "job checkpoints and pauses (or cools down: cooldown_s) when it runs above it",
            gt=0,
        ),
    ] = 85.0
    max_memory_pct: Annotated[
        float,
        _m(
            "memory fullness limit (%): `ftctl doctor` flags a GPU fuller than this; the memory guard's "
            "limit when memory_limit_gb is null (of the machine's RAM; on CUDA also of the GPU's memory)",
            gt=0,
            le=100,
        ),
    ] = 95.0
    memory_limit_gb: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        _m(
            "the training worker's memory ceiling in GB (its RSS + swap; on CUDA also MLX's active + cache "
            "memory); null = max_memory_pct of the memory there is",
            "a number > 0, or null",
        ),
    ] = None
    memory_horizon_steps: Annotated[
        int,
        _m(
            "when the worker's memory trend reaches the ceiling within this many steps, the job checkpoints "
            "and continues in a fresh worker (a planned restart, not a crash); 0 = no memory guard",
            ge=0,
        ),
    ] = 50
    cooldown_s: Annotated[
        float,
        _m(
            "over max_temperature_c: 0 = pause the job (`ftctl resume` continues it); more = wait this many "
            "seconds, then resume by itself",
            ge=0,
        ),
    ] = 0.0


class Consolidation(Struct, kw_only=True, forbid_unknown_fields=True):
    schedule: Annotated[
        Annotated[str, Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")] | None,
        _m(
            "daily local time HH:MM to fuse the adapter into a new base model; null = never",
            "a time 'HH:MM' (24-hour, local), or null",
        ),
    ] = None
    keep_models: Annotated[int, _m("number of consolidated models kept on disk", ge=1)] = 2


NOTIFY_EVENTS = (
    "completed",
    "failed",
    "crashed",
    "paused",
    "cancelled",
    "consolidated",
    "daemon_started",
    "daemon_stopped",
    "alert",
)
NotifyEvent = Literal[
    "completed",
    "failed",
    "crashed",
    "paused",
    "cancelled",
    "consolidated",
    "daemon_started",
    "daemon_stopped",
    "alert",
]


class NotifyTarget(Struct, kw_only=True, forbid_unknown_fields=True):
    url: Annotated[
        str | None,
        _m(
            "URL each event is POSTed to (a webhook, an ntfy topic); give url or command",
            "an http:// or https:// URL, or null",
        ),
    ] = None
    command: Annotated[
        Annotated[list[str], Meta(min_length=1)] | None,
        _m(
            "a program and its arguments, run with the event as JSON on stdin; exit 0 = delivered (instead of url)",
            "a non-empty list of strings (program first), or null",
        ),
    ] = None
    events: Annotated[
        Annotated[list[NotifyEvent], Meta(min_length=1)],
        _m("the events sent to this target", "a non-empty list of " + ", ".join(NOTIFY_EVENTS)),
    ] = field(
        default_factory=lambda: [
            "completed",
            "failed",
            "crashed",
            "paused",
            "consolidated",
            "daemon_stopped",
            "alert",
        ]
    )
    format: Annotated[
        Literal["json", "slack", "ntfy"],
        _m(
            "body of the POST: json (the event and a summary), slack ({text}), ntfy (plain text, title and tags)"
        ),
    ] = "json"
    timeout_s: Annotated[float, _m("seconds one delivery attempt may take", gt=0)] = 10.0
    retries: Annotated[
        int, _m("attempts after the first before the failure is recorded", ge=0, le=20)
    ] = 3
    backoff_s: Annotated[float, _m("wait before the first retry, doubled after each", ge=0)] = 2.0

    def key(self) -> str:
        """The target's identity: where its last notified sequence number is kept."""
        return (
            f"url {self.url}"
            if self.url is not None
            else "command " + msgspec.json.encode(self.command).decode()
        )


class Power(Struct, kw_only=True, forbid_unknown_fields=True):
    prevent_sleep: Annotated[
        bool,
        _m(
            "while a job trains, keep the machine from sleeping (macOS: caffeinate -i -s; Linux: systemd-inhibit "
            "--what=sleep:idle, where installed)"
        ),
    ] = True


class MetricsOut(Struct, kw_only=True, forbid_unknown_fields=True):
    tensorboard: Annotated[
        bool,
        _m(
            "also write TensorBoard event files under WS/tensorboard/<job>/ while training "
            "(needs the ftctl[tensorboard] extra); `ftctl export-tb` writes them from the journal at any time"
        ),
    ] = False


class Alerts(Struct, kw_only=True, forbid_unknown_fields=True):
    spike_factor: Annotated[
        Annotated[float, Meta(gt=1)] | None,
        _m(
            "a loss spike: a train loss above this many times the median of the spike_window reports "
            "before it (at least 3 of them); null = not watched",
            "a number > 1, or null",
        ),
    ] = 3.0
    spike_window: Annotated[
        int, _m("reports whose median a train loss is compared with", ge=1, le=1000)
    ] = 10
    on_spike: Annotated[
        Literal["record", "pause"],
        _m(
            "what a loss spike does besides being recorded and notified: record (nothing more) or pause "
            "(the job checkpoints and pauses, as `ftctl pause`; `ftctl resume` continues it)"
        ),
    ] = "record"
    plateau_evals: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        _m(
            "a plateau: this many evaluations in a row without a new best validation loss; null = not "
            "watched",
            "an integer >= 1, or null",
        ),
    ] = 5
    plateau_min_delta: Annotated[
        float, _m("how much lower than the best a validation loss must be to count as one", ge=0)
    ] = 0.0
    throughput_factor: Annotated[
        Annotated[float, Meta(gt=1)] | None,
        _m(
            "a throughput drop: throughput_reports reports in a row under 1/this of the median tokens/s "
            "of the throughput_window reports before them (thermal throttling, swapping); null = not "
            "watched",
            "a number > 1, or null",
        ),
    ] = 2.0
    throughput_window: Annotated[
        int, _m("reports whose median tokens/s a report is compared with", ge=1, le=1000)
    ] = 10
    throughput_reports: Annotated[
        int,
        _m(
            "reports in a row that must be slow before it is a drop (one slow report is noise)",
            ge=1,
        ),
    ] = 3


class Distributed(Struct, kw_only=True, forbid_unknown_fields=True):
    backend: Annotated[
        Literal["ring", "mpi", "jaccl", "any"],
        _m(
            "MLX's distributed backend (mx.distributed): ring (TCP, loopback or Ethernet/Thunderbolt), "
            "mpi, jaccl (RDMA over Thunderbolt 5), any = mlx.launch's default"
        ),
    ] = "ring"
    hosts: Annotated[
        list[Annotated[str, Meta(min_length=1)]] | None,
        _m(
            "the hosts to train on, in rank order (IP addresses for ring); null = use hostfile",
            "a list of host names or IP addresses, or null",
        ),
    ] = None
    hostfile: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "an mlx.launch JSON hostfile (one entry per rank: ssh name, ips, rdma); instead of hosts",
            "a path, or null",
        ),
    ] = None
    processes_per_host: Annotated[
        int,
        _m(
            "ranks started on each host of `hosts` (with a hostfile: list a host once per rank)",
            ge=1,
        ),
    ] = 1
    controller: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "the address the other hosts reach this machine (the daemon) at; null = 127.0.0.1 when every host "
            "is local, else this machine's host name",
            "a host name or IP address, or null",
        ),
    ] = None


# ---------------------------------------------------------------------------------------------
# mlx_lm.lora's keys beyond the training shape (issue 20): data as mlx-lm users hold it, where the
# adapter goes, the test split, trackers. MLX_LM_DEFAULTS is mlx_lm.lora.CONFIG_DEFAULTS, written out
# (a test compares it with the installed mlx-lm): `ftctl lora` fills in these where its flags and -c
# file are silent, exactly as mlx_lm.lora does.

MLX_LM_DEFAULTS: dict[str, Any] = {
    "model": "Qwen/Qwen3-0.6b",
    "train": False,
    "fine_tune_type": "lora",
    "optimizer": "adam",
    "optimizer_config": {"adam": {}, "adamw": {}, "muon": {}, "sgd": {}, "adafactor": {}},
    "data": "mlx-community/WikiSQL",
    "seed": 0,
    "num_layers": 16,
    "batch_size": 4,
    "iters": 1000,
    "val_batches": 25,
    "learning_rate": 1e-5,
    "steps_per_report": 10,
    "steps_per_eval": 200,
    "resume_adapter_file": None,
    "adapter_path": "adapters",
    "save_every": 100,
    "test": False,
    "test_batches": 500,
    "max_seq_length": 2048,
    "config": None,
    "grad_checkpoint": False,
    "grad_accumulation_steps": 1,
    "clear_cache_threshold": 0,
    "lr_schedule": None,
    "lora_parameters": {"rank": 8, "dropout": 0.0, "scale": 20.0},
    "mask_prompt": False,
    "report_to": None,
    "project_name": None,
    "trust_remote_code": False,
}
# Keys mlx_lm.lora reads only from a -c file (no flag, not in CONFIG_DEFAULTS).
MLX_LM_FILE_ONLY = (
    "lora_parameters",
    "lr_schedule",
    "hf_dataset",
    "prompt_feature",
    "completion_feature",
    "text_feature",
    "chat_feature",
)
# mlx-lm's trackers (mlx_lm.tuner.callbacks.SUPPORT_CALLBACK) -> the package each one imports
TRACKERS = {"wandb": "wandb", "swanlab": "swanlab"}
FEATURES = (
    "prompt_feature",
    "completion_feature",
    "text_feature",
    "chat_feature",
    "chosen_feature",
    "rejected_feature",
    "system_feature",
)
DEFAULT_FEATURES = {
    "prompt_feature": "prompt",
    "completion_feature": "completion",
    "text_feature": "text",
    "chat_feature": "messages",
    "chosen_feature": "chosen",
    "rejected_feature": "rejected",
    "system_feature": "system",
}
# mlx-lm-lora's preference keys (its train.py CONFIG_DEFAULTS) that ftctl reads, with its defaults:
# `ftctl lora` fills them in as it fills in mlx-lm's
MLX_LM_LORA_DEFAULTS: dict[str, Any] = {
    "train_mode": "sft",
    "beta": 0.1,
    "dpo_cpo_loss_type": "sigmoid",
    "delta": 50.0,
    "reference_model_path": None,
}
_Feature = Annotated[str, Meta(min_length=1)]


class HFDataset(Struct, kw_only=True, forbid_unknown_fields=True):
    path: Annotated[
        str,
        _m(
            "a Hugging Face dataset name in the local `datasets` cache, or a folder written by "
            "datasets' save_to_disk (never downloaded)",
            "a dataset name or a folder",
            min_length=1,
        ),
    ]
    train_split: Annotated[
        str, _m("the split (with datasets' slicing) trained on", min_length=1)
    ] = "train[:80%]"
    valid_split: Annotated[str, _m("the split used for validation loss", min_length=1)] = (
        "train[-10%:]"
    )
    test_split: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m("the split `test: true` scores; null = none", "a split, or null"),
    ] = None
    config: Annotated[
        dict[str, Any],
        _m("extra arguments of datasets.load_dataset, e.g. {name: subset}", "a mapping"),
    ] = {}
    prompt_feature: Annotated[_Feature, _m("the column holding the prompt")] = "prompt"
    completion_feature: Annotated[_Feature, _m("the column holding the completion")] = "completion"
    text_feature: Annotated[_Feature, _m("the column holding the text")] = "text"
    chat_feature: Annotated[_Feature, _m("the column holding the chat messages")] = "messages"
    chosen_feature: Annotated[_Feature, _m("the column holding the preferred answer")] = "chosen"
    rejected_feature: Annotated[_Feature, _m("the column holding the dispreferred answer")] = (
        "rejected"
    )
    system_feature: Annotated[_Feature, _m("the column holding the system prompt")] = "system"


LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


class Config(Struct, kw_only=True, forbid_unknown_fields=True):
    # mlx-lm keys
    model: Annotated[
        str,
        _m(
            "an mlx-lm model folder, a Hugging Face repo id or a .gguf file",
            "a non-empty path or repo id",
            min_length=1,
        ),
    ]
    fine_tune_type: Annotated[
        Literal["lora", "dora", "full"],
        _m(
            "lora or dora (an adapter on the frozen model) or full (the weights of the last num_layers "
            "layers themselves are trained, as in mlx-lm)"
        ),
    ] = "lora"
    optimizer: Annotated[
        Literal["adam", "adamw", "sgd", "adafactor", "muon"], _m("mlx optimizer")
    ] = "adam"
    optimizer_config: Annotated[
        dict[str, dict[str, Any]],
        _m(
            "extra optimizer settings by optimizer name, e.g. {adamw: {weight_decay: 0.01}}",
            "a mapping of optimizer name to a mapping of settings, e.g. {adamw: {weight_decay: 0.01}}",
        ),
    ] = {}
    learning_rate: Annotated[float, _m("learning rate (ignored when lr_schedule is set)", gt=0)] = (
        1e-5
    )
    lr_schedule: Annotated[
        LRSchedule | None,
        _m("learning rate schedule as in mlx-lm; null = constant learning_rate"),
    ] = None
    lora_parameters: Annotated[LoraParameters, _m("LoRA adapter shape")] = field(
        default_factory=LoraParameters
    )
    num_layers: Annotated[
        int,
        _m(
            "number of final transformer layers to adapt (full: to train); -1 = all",
            "-1 (all layers) or an integer >= 1",
            ge=-1,
        ),
    ] = 16
    batch_size: Annotated[int, _m("examples per iteration", ge=1)] = 4
    iters: Annotated[int, _m("training iterations (micro-batches), as in mlx-lm", ge=1)] = 1000
    save_every: Annotated[
        int, _m("checkpoint every N iterations (and always at the end)", ge=1)
    ] = 100
    steps_per_report: Annotated[int, _m("report training loss every N iterations", ge=1)] = 10
    steps_per_eval: Annotated[int, _m("compute val_loss every N iterations", ge=1)] = 200
    val_batches: Annotated[
        int,
        _m(
            "validation batches per evaluation; -1 = the whole validation set",
            "-1 (whole validation set) or an integer >= 1",
            ge=-1,
        ),
    ] = 25
    max_seq_length: Annotated[
        int, _m("longer examples are truncated to this many tokens", ge=2)
    ] = 2048
    seed: Annotated[
        int, _m("random seed for batching, dropout and LoRA init", ge=0, le=2**32 - 1)
    ] = 0
    mask_prompt: Annotated[bool, _m("train on completions only (chat and completions data)")] = (
        False
    )
    grad_accumulation_steps: Annotated[int, _m("iterations per optimizer update", ge=1)] = 1
    grad_checkpoint: Annotated[bool, _m("recompute activations to save memory")] = False
    # mlx-lm-lora's preference training keys (issue 23): its names, so its users' configs carry over
    train_mode: Annotated[
        Literal["sft", "dpo", "orpo"],
        _m(
            "sft (examples: text, completions, chat) or preference training on prompt/chosen/rejected "
            "pairs: dpo (against a reference: the base model) or orpo (no reference)",
            "one of 'sft', 'dpo', 'orpo' (mlx-lm-lora's other modes are not supported)",
        ),
    ] = "sft"
    beta: Annotated[
        float,
        _m(
            "dpo/orpo: the strength of the preference term (DPO's temperature, ORPO's weight)", gt=0
        ),
    ] = 0.1
    dpo_cpo_loss_type: Annotated[
        Literal["sigmoid", "hinge", "ipo", "dpop"],
        _m("dpo: the loss on the reward margin, as mlx-lm-lora names them"),
    ] = "sigmoid"
    delta: Annotated[
        float, _m("dpo with dpo_cpo_loss_type dpop: the weight of DPOP's chosen-side penalty", ge=0)
    ] = 50.0
    reference_model_path: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "dpo: the reference model (an mlx-lm folder), loaded once beside the trained one; null = "
            "the base model itself (lora/dora: the adapter switched off, no second copy; full: a "
            "frozen copy of the trained layers only)",
            "a model folder, or null",
        ),
    ] = None
    max_grad_norm: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        _m(
            "clip gradients to this global norm before each update; null = no clipping",
            "a number > 0, or null",
        ),
    ] = None
    # mlx_lm.lora's keys beyond the training shape (issue 20)
    train: Annotated[
        bool,
        _m(
            "train (false with test: true only scores the adapter at adapter_path on the test split, "
            "as mlx_lm.lora --test without --train does)"
        ),
    ] = True
    data: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "the data when `ftctl submit` names none: a folder with train.jsonl, valid.jsonl and "
            "optionally test.jsonl (mlx-lm's layout), a JSONL file, or a Hugging Face dataset name in "
            "the local `datasets` cache; null = name it on the command line",
            "a folder, a file or a dataset name, or null",
        ),
    ] = None
    hf_dataset: Annotated[
        HFDataset | list[HFDataset] | None,
        _m(
            "Hugging Face dataset(s) to train on, as mlx-lm reads them (several are concatenated); "
            "read from the local cache or a save_to_disk folder at submit, never downloaded; null = none",
            "a mapping {path, train_split, valid_split, test_split, config, *_feature}, a list of "
            "them, or null",
        ),
    ] = None
    prompt_feature: Annotated[_Feature, _m("the key holding the prompt in completions data")] = (
        "prompt"
    )
    completion_feature: Annotated[
        _Feature, _m("the key holding the completion in completions data")
    ] = "completion"
    text_feature: Annotated[_Feature, _m("the key holding the text in text data")] = "text"
    chat_feature: Annotated[_Feature, _m("the key holding the messages in chat data")] = "messages"
    chosen_feature: Annotated[
        _Feature, _m("the key holding the preferred answer in preference data (mlx-lm-lora)")
    ] = "chosen"
    rejected_feature: Annotated[
        _Feature, _m("the key holding the dispreferred answer in preference data (mlx-lm-lora)")
    ] = "rejected"
    system_feature: Annotated[
        _Feature, _m("the key holding the optional system prompt in preference data (mlx-lm-lora)")
    ] = "system"
    adapter_path: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "where the finished adapter is also published, in mlx-lm's layout (adapters.safetensors, "
            "adapter_config.json), atomically; a folder ftctl did not write is never replaced; null = "
            "only jobs/<id>/adapters/",
            "a folder, or null",
        ),
    ] = None
    resume_adapter_file: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "start from these adapter weights (an adapters.safetensors file; copied into the job and its "
            "sha256 recorded at submit) instead of the lineage's adapter; null = none",
            "a file, or null",
        ),
    ] = None
    test: Annotated[
        bool,
        _m(
            "after training, score the adapter (and the base model) on the test split, recorded like "
            "`ftctl eval`"
        ),
    ] = False
    test_batches: Annotated[
        int,
        _m(
            "test batches scored; -1 = the whole test split",
            "-1 (whole test split) or an integer >= 1",
            ge=-1,
        ),
    ] = 500
    clear_cache_threshold: Annotated[
        int,
        _m(
            "after each step, free MLX's allocator cache when it holds more than this many bytes (0 = "
            "every step, as mlx-lm)",
            ge=0,
        ),
    ] = 0
    report_to: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m(
            "also log training to these trackers, comma-separated (wandb, swanlab), in their offline/local "
            "mode; the tracker's package must be installed; null = none",
            "wandb, swanlab or 'wandb,swanlab', or null",
        ),
    ] = None
    project_name: Annotated[
        Annotated[str, Meta(min_length=1)] | None,
        _m("the trackers' project name; null = the tracker's default", "a name, or null"),
    ] = None
    trust_remote_code: Annotated[
        bool, _m("let the model's and tokenizer's own Python code run when they load")
    ] = False
    # ftctl's own keys
    # how long a job trains, and which checkpoint becomes its result (docs/config.md, "Epochs, early
    # stopping and the result")
    epochs: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        _m(
            "train this many passes over the training data instead of `iters`: the job records "
            "iters = epochs x batches per epoch (training examples // batch_size); null = use iters",
            "an integer >= 1, or null",
        ),
    ] = None
    early_stopping: Annotated[
        EarlyStopping | None,
        _m(
            "stop training (the job completes) once the validation loss stops improving; null = "
            "train to the end",
            "a mapping {patience, min_delta}, or null",
        ),
    ] = None
    result: Annotated[
        Literal["best", "last"],
        _m(
            "which checkpoint becomes the job's adapter: best = the lowest validation loss (the last "
            "one without validation data), last = the final step's"
        ),
    ] = "best"
    warm_start: Annotated[
        bool, _m("start from the adapter of the lineage's previous completed job")
    ] = True
    retention: Annotated[Retention, _m("which checkpoints are kept")] = field(
        default_factory=Retention
    )
    restart: Annotated[RestartPolicy, _m("automatic restarts after a crash")] = field(
        default_factory=RestartPolicy
    )
    timeouts: Annotated[Timeouts, _m("hang detection and stop timeouts")] = field(
        default_factory=Timeouts
    )
    guards: Annotated[
        Guards, _m("device thresholds and the guards that act on them (docs/hardware.md)")
    ] = field(default_factory=Guards)
    min_free_disk_gb: Annotated[
        float,
        _m(
            "a job does not start (it is paused, with the reason) below this free disk space (GB), "
            "nor below what its checkpoints will take (keep_last, the best and the one being written, "
            "and the published weights; a full fine-tune's estimated from the model before its first "
            "checkpoint)",
            ge=0,
        ),
    ] = 1.0
    standby: Annotated[
        bool,
        _m(
            "keep one spare worker, its imports done, that takes the next job or restart at once; "
            "started once the training worker has run ten times as long as it took to load, so a "
            "short job never pays for it (skipped while available memory is low)"
        ),
    ] = True
    blas: Annotated[
        str,
        _m(
            "the BLAS the training worker runs on (Linux CPU backend): auto = an optimized OpenBLAS when one is "
            "installed (system or the cmeel-openblas wheel), else mlx[cpu]'s bundled reference BLAS; "
            "reference = always the bundled one; or the path of a BLAS shared library to preload. "
            "Results are bit-exact within one BLAS only",
            "auto, reference, or a library path",
            min_length=1,
        ),
    ] = "auto"
    blas_threads: Annotated[
        int,
        _m(
            "the training worker's OpenBLAS threads (Linux CPU backend): 0 = measured when the job's worker "
            "first loads (its model's matmuls timed on 1, 2, 4 … threads up to the cores, with the machine "
            "as busy as it is then: the fewest threads within 10% of the fastest, and no more than the cores "
            "other processes' running threads leave), or OPENBLAS_NUM_THREADS "
            "where the daemon's environment sets it; N = N threads. Decided once per job and kept: the "
            "thread count changes the bits, so resumes, retries and `ftctl reproduce` use the job's "
            "recorded count",
            ge=0,
        ),
    ] = 0
    consolidation: Annotated[
        Consolidation, _m("periodic fusing of the adapter into the base model")
    ] = field(default_factory=Consolidation)
    # the daemon's own settings, read from ftctl.yaml as it is now (not recorded in a job: see job_config)
    notify: Annotated[
        list[NotifyTarget],
        _m(
            "where the daemon sends events once they are committed (docs/operations.md)",
            "a list of targets, each a mapping with url or command",
        ),
    ] = []
    power: Annotated[Power, _m("power management while a job trains")] = field(
        default_factory=Power
    )
    metrics: Annotated[MetricsOut, _m("where training metrics go besides the journal")] = field(
        default_factory=MetricsOut
    )
    alerts: Annotated[
        Alerts,
        _m(
            "training-health alerts the daemon records from the job's curves (loss spike, plateau, "
            "throughput drop): an event, a notification, optionally a pause (docs/config.md, alerts)"
        ),
    ] = field(default_factory=Alerts)
    distributed: Annotated[
        Distributed | None,
        _m(
            "data-parallel training over several processes or Macs with MLX's own engine (mlx.launch, "
            "mx.distributed); null = one training process",
            "a mapping {backend, hosts | hostfile, processes_per_host, controller}, or null",
        ),
    ] = None


@functools.cache
def config_type() -> mi.StructType:
    """msgspec's description of Config, built on first use: building it costs every process that
    imports this module (the CLI before it starts a worker, the worker itself) about 15 ms."""
    return mi.type_info(Config)


# ---------------------------------------------------------------------------------------------
# checks msgspec cannot express


def _nonfinite(value: Any, path: str) -> tuple[str, Any] | None:
    if isinstance(value, float) and not math.isfinite(value):
        return path, value
    if isinstance(value, dict):
        for k, v in value.items():
            found = _nonfinite(v, E.join(path, str(k)))
            if found:
                return found
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _nonfinite(v, f"{path}[{i}]")
            if found:
                return found
    return None


def _check(cfg: Config, source: str) -> None:
    def fail(key: str, value: Any, allowed: str, why: str = "is out of range") -> None:
        raise ConfigError(
            f"{source}: {key} = {E.show(value)} {why}: must be {allowed}",
            key=key,
            value=value,
            allowed=allowed,
        )

    for name in cfg.optimizer_config:
        if name not in OPTIMIZERS:
            raise E.unknown_key(
                source, "optimizer_config", name, cfg.optimizer_config[name], list(OPTIMIZERS)
            )
    for name, settings in cfg.optimizer_config.items():
        for setting, value in settings.items():
            items = value if isinstance(value, list) else [value]
            if not all(v is None or isinstance(v, (bool, int, float, str)) for v in items):
                fail(
                    f"optimizer_config.{name}.{setting}",
                    value,
                    "a number, string, boolean, null or a list of them",
                    "is not valid",
                )
    found = _nonfinite(msgspec.to_builtins(cfg), "")
    if found:
        fail(found[0], found[1], "a finite number", "is not allowed")
    for name in ("num_layers", "val_batches", "test_batches"):
        if getattr(cfg, name) == 0:
            fail(name, 0, E.allowed(_field_type(name)))
    g = cfg.grad_accumulation_steps
    for name in ("save_every", "steps_per_eval"):
        value = getattr(cfg, name)
        if value % g:
            allowed = f"a multiple of grad_accumulation_steps = {g}"
            raise ConfigError(
                f"{source}: {name} = {value} must be {allowed} "
                "(checkpoints and evaluations fall on optimizer updates)",
                key=name,
                value=value,
                allowed=allowed,
            )
    _check_mlx_lm_keys(cfg, fail)
    _check_preference_keys(cfg, fail)
    for i, n in enumerate(cfg.notify):
        if (n.url is None) == (n.command is None):
            raise ConfigError(
                f"{source}: notify[{i}] needs exactly one of url or command",
                key=f"notify[{i}]",
                value=msgspec.to_builtins(n),
                allowed="url: URL, or command: [program, args...]",
            )
        if n.url is not None and not re.match(r"^https?://[^/\s]+", n.url):
            fail(f"notify[{i}].url", n.url, "an http:// or https:// URL", "is not valid")
        if n.command is not None and not n.command[0]:
            fail(f"notify[{i}].command[0]", n.command[0], "a program name or path", "is not valid")
    t = cfg.timeouts
    if t.eval_hang_s < t.hang_s:
        fail(
            "timeouts.eval_hang_s",
            t.eval_hang_s,
            f">= timeouts.hang_s = {t.hang_s:g}",
            "is too small",
        )
    r = cfg.restart
    if r.backoff_max_s < r.backoff_s:
        fail(
            "restart.backoff_max_s",
            r.backoff_max_s,
            f">= restart.backoff_s = {r.backoff_s:g}",
            "is too small",
        )
    dist = cfg.distributed
    if dist is not None:
        if (dist.hosts is None) == (dist.hostfile is None):
            fail(
                "distributed",
                msgspec.to_builtins(dist),
                "one of hosts (a list) or hostfile (a path)",
                "names no hosts" if dist.hosts is None else "names both hosts and a hostfile",
            )
        if dist.hostfile is not None and dist.processes_per_host != 1:
            fail(
                "distributed.processes_per_host",
                dist.processes_per_host,
                "1 with a hostfile (list a host once for each rank it runs)",
                "is not allowed",
            )
        if dist.hosts is not None:
            if not dist.hosts:
                fail("distributed.hosts", [], "at least one host", "is empty")
            n = world_size(cfg)
            if cfg.batch_size % n:
                fail(
                    "batch_size",
                    cfg.batch_size,
                    f"a multiple of the world size {n} (each rank takes "
                    "batch_size / world size "
                    + ("examples" if cfg.train_mode == "sft" else "pairs")
                    + " of every batch)",
                    "does not split over the ranks",
                )
    s = cfg.lr_schedule
    if s is not None:
        sig, lo, hi, steps = SCHEDULES[s.name]
        n = len(s.arguments)
        if not lo <= n <= hi:
            count = str(lo) if lo == hi else f"{lo} to {hi}"
            fail(
                "lr_schedule.arguments",
                s.arguments,
                f"{count} numbers for {s.name}({sig})",
                "does not fit the schedule",
            )
        if s.arguments[0] <= 0:
            fail("lr_schedule.arguments[0]", s.arguments[0], "> 0 (the initial learning rate)")
        for i in steps:
            if s.arguments[i] < 1:
                fail(
                    f"lr_schedule.arguments[{i}]",
                    s.arguments[i],
                    f">= 1 ({sig.replace('[', '').replace(']', '').split(', ')[i]} is a step count)",
                )


def features(cfg: Config | HFDataset) -> Features:
    """The keys the data's format is read from: mlx-lm's *_feature keys (of the config, or of one
    hf_dataset entry)."""
    return Features(*(getattr(cfg, k) for k in FEATURES))


def hf_entries(cfg: Config) -> list[HFDataset]:
    """``hf_dataset`` as a list (mlx-lm takes one mapping or a list of them)."""
    h = cfg.hf_dataset
    return [] if h is None else [h] if isinstance(h, HFDataset) else list(h)


def _check_mlx_lm_keys(cfg: Config, fail) -> None:
    if cfg.report_to is not None:
        for name in (x.strip().lower() for x in cfg.report_to.split(",")):
            if name not in TRACKERS:
                fail(
                    "report_to",
                    cfg.report_to,
                    ", ".join(TRACKERS) + " (comma-separated)",
                    "names an unknown tracker",
                )
    if cfg.hf_dataset is not None:
        if not hf_entries(cfg):
            fail("hf_dataset", [], "a mapping with path, or a non-empty list of them", "is empty")
        if cfg.data is not None:
            fail(
                "data",
                cfg.data,
                "null when hf_dataset is set (mlx-lm would read hf_dataset and ignore data)",
                "is given beside hf_dataset",
            )
        for key, default in DEFAULT_FEATURES.items():
            if getattr(cfg, key) != default:
                fail(
                    key,
                    getattr(cfg, key),
                    f"{default!r} beside hf_dataset: set it inside each hf_dataset entry, where mlx-lm reads it",
                    "is not read with hf_dataset",
                )


def _check_preference_keys(cfg: Config, fail) -> None:
    if cfg.reference_model_path is not None and cfg.train_mode != "dpo":
        fail(
            "reference_model_path",
            cfg.reference_model_path,
            "null with train_mode " + cfg.train_mode + " (only dpo compares against a reference)",
            "is not used",
        )


def world_size(cfg: Config, hostfile_hosts: int | None = None) -> int:
    """Ranks the job trains on: 1 without `distributed`; hosts x processes_per_host; or the number of
    entries of the hostfile (``hostfile_hosts``, read by the caller: this module does no I/O)."""
    d = cfg.distributed
    if d is None:
        return 1
    if d.hosts is not None:
        return len(d.hosts) * d.processes_per_host
    if hostfile_hosts is None:
        raise ValueError("world_size of a hostfile config needs the hostfile's host count")
    return hostfile_hosts


def keep_last(cfg: Config) -> int:
    """How many of the newest checkpoints retention keeps: ``retention.keep_last``, or by fine-tune type
    when it is null (KEEP_LAST)."""
    k = cfg.retention.keep_last
    return KEEP_LAST[cfg.fine_tune_type] if k is None else k


def resolve_epochs(cfg: Config, train_examples: int) -> Config:
    """The config a job records: with ``epochs`` set, ``iters`` = epochs x batches per epoch. An epoch
    is one pass over the batches of adapters/batches.py's TrainBatches: the training examples sorted by
    length and cut into train_examples // batch_size full batches (as mlx-lm cuts them; the
    train_examples % batch_size longest examples are in no batch), visited in an order drawn for that
    epoch, so iteration n is in epoch n // batches. ``batch_size`` is the global batch of a
    data-parallel job. Without ``epochs`` the config is returned as it is."""
    if cfg.epochs is None:
        return cfg
    per_epoch = batches_per_epoch(cfg, train_examples)
    if per_epoch is None:
        raise ConfigError(
            f"epochs = {cfg.epochs} needs at least one batch per epoch, but the training data has "
            f"{train_examples} examples, fewer than batch_size = {cfg.batch_size}: lower batch_size or "
            "add data",
            key="epochs",
            value=cfg.epochs,
            allowed=f"a training set of at least batch_size = {cfg.batch_size} examples",
        )
    return msgspec.structs.replace(cfg, iters=cfg.epochs * per_epoch)


def batches_per_epoch(cfg: Config, train_examples: int | None = None) -> int | None:
    """The batches of one epoch (resolve_epochs's, epoch_of's): train_examples // batch_size — a job
    trained by iters passes over its data too. Without the count (a journal from before job_submitted
    recorded ``train_examples``), a job trained by ``epochs`` still says it: its recorded iters are
    epochs x batches. None when neither is known, or under one batch."""
    if train_examples is not None:
        return train_examples // cfg.batch_size or None
    return max(cfg.iters // cfg.epochs, 1) if cfg.epochs is not None else None


def epochs_trained(cfg: Config, step: int, train_examples: int | None = None) -> float | None:
    """The passes over the training data ``step`` steps make: step / batches per epoch (1.5: halfway
    through the second epoch; a job trained by epochs ends on epochs). None when the batches per epoch
    are not known."""
    per_epoch = batches_per_epoch(cfg, train_examples)
    return None if per_epoch is None else step / per_epoch


def epoch_of(cfg: Config, step: int) -> tuple[int, int] | None:
    """(the epoch ``step`` is in, counted from 1; epochs) for a job trained by ``epochs``, else None.
    Step 0 (nothing trained yet) is in epoch 1, the last step in the last epoch."""
    if cfg.epochs is None:
        return None
    per_epoch = batches_per_epoch(cfg)
    return min(max(step - 1, 0) // per_epoch + 1, cfg.epochs), cfg.epochs


def _field_type(name: str) -> Any:
    return next(f.type for f in config_type().fields if f.name == name)


def _warnings(cfg: Config) -> list[str]:
    out = []
    s = cfg.lr_schedule
    lr = s.arguments[0] if s else cfg.learning_rate
    lr_key = "lr_schedule.arguments[0]" if s else "learning_rate"
    if s and s.arguments[0] != cfg.learning_rate:
        out.append(
            f"learning_rate = {cfg.learning_rate:g} is ignored: the schedule starts from "
            f"lr_schedule.arguments[0] = {s.arguments[0]:g}"
        )
    if lr > 1e-3:
        out.append(f"{lr_key} = {lr:g} is high for LoRA (usual 1e-6 to 1e-3): the loss may diverge")
    if s and s.warmup >= cfg.iters:
        out.append(
            f"lr_schedule.warmup = {s.warmup} >= iters = {cfg.iters}: the run ends before "
            "warmup does"
        )
    if cfg.steps_per_eval > cfg.iters:
        out.append(
            f"steps_per_eval = {cfg.steps_per_eval} > iters = {cfg.iters}: validation "
            "would never run during training and val_loss would stay empty until the "
            "final step"
        )
    if cfg.save_every > cfg.iters:
        out.append(
            f"save_every = {cfg.save_every} > iters = {cfg.iters}: only the final "
            "checkpoint will be written"
        )
    if cfg.iters < cfg.steps_per_report:
        out.append(
            f"iters = {cfg.iters} < steps_per_report = {cfg.steps_per_report}: the "
            "training loss is reported only at the final step"
        )
    if cfg.lora_parameters.dropout > 0.5:
        out.append(
            f"lora_parameters.dropout = {cfg.lora_parameters.dropout:g} is above 0.5: "
            "most of the adapter input is dropped"
        )
    if cfg.batch_size > 64:
        out.append(
            f"batch_size = {cfg.batch_size} is above 64: expect to run out of memory; "
            "use grad_accumulation_steps for large effective batches"
        )
    if cfg.max_seq_length > 32768:
        out.append(
            f"max_seq_length = {cfg.max_seq_length} is above 32768: long examples may "
            "run out of memory"
        )
    for name, settings in cfg.optimizer_config.items():
        if name != cfg.optimizer and settings:  # mlx-lm's defaults list every optimizer, empty
            out.append(f"optimizer_config.{name} is ignored: optimizer is {cfg.optimizer!r}")
    if cfg.early_stopping is not None and cfg.steps_per_eval >= cfg.iters:
        out.append(
            f"early_stopping: steps_per_eval = {cfg.steps_per_eval} >= iters = {cfg.iters}: the "
            "validation loss is measured at most once, so training can never stop early"
        )
    return out


def config_warnings(cfg: Config) -> list[str]:
    """The warnings of a resolved config (decode_config's, computed again once `epochs` has set
    `iters`)."""
    return _warnings(cfg)


# ---------------------------------------------------------------------------------------------
# public API


def decode_config(data: dict, *, source: str = "ftctl.yaml") -> tuple[Config, list[str]]:
    """Validate a ftctl.yaml mapping. Returns (config, warnings); raises ConfigError only."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(
            f"{source}: the file must be a mapping of keys to values (model: ..., iters: ...), "
            f"but it is {kind}",
            key="",
            value=data,
            allowed="a mapping",
        )
    if "config" in data:  # mlx_lm.lora's `config` (the -c file's path): a file cannot name another
        if data["config"] is not None:
            raise ConfigError(
                f"{source}: config = {E.show(data['config'])} is not followed: a config file cannot name "
                "another (mlx_lm.lora does not follow it either); pass it with `ftctl lora -c FILE`",
                key="config",
                value=data["config"],
                allowed="null",
            )
        data = {k: v for k, v in data.items() if k != "config"}
    try:
        prepared = E.prepare(data, config_type(), "", source)
        problem = E.check(prepared, config_type(), "", source)
        if problem is not None:
            raise problem
        try:
            cfg = msgspec.convert(prepared, Config)
        except (
            msgspec.ValidationError
        ) as e:  # one the schema walk missed: msgspec's words, as they are
            raise ConfigError(f"{source}: {e}", value=None) from None
        _check(cfg, source)
        return cfg, _warnings(cfg)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{source}: the mapping is nested too deeply", value=None) from None
    except Exception as e:  # last line of defence: the caller must only ever see ConfigError
        raise ConfigError(f"{source}: cannot read the config: {e}".replace("\n", " ")) from None


_OVERRIDE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*=(.*)$", re.S)


def merge_overrides(base: dict, overrides: list[str]) -> dict:
    """Apply 'dotted.key=value' overrides (values read as YAML scalars) to a copy of base."""
    if not isinstance(base, dict):
        raise ConfigError("config overrides need a mapping to apply to", value=base)
    out = copy.deepcopy(base)
    for item in overrides:
        m = _OVERRIDE.match(item) if isinstance(item, str) else None
        if not m:
            raise ConfigError(
                f"override {E.show(item)} is not key=value: write e.g. learning_rate=2e-4 "
                "or lora_parameters.rank=16",
                value=item,
                allowed="key=value",
            )
        dotted, text = m.group(1), m.group(2).strip()
        import yaml  # only overrides need it: keeps every command's start-up light

        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError as e:
            problem = getattr(e, "problem", None) or "invalid YAML"
            raise ConfigError(
                f"override {dotted}: cannot read {E.show(text)} as a YAML value ({problem}); "
                "quote it if it is a string",
                key=dotted,
                value=text,
                allowed="a YAML scalar or list",
            ) from None
        *parents, last = dotted.split(".")
        node, walked = out, []
        for p in parents:
            walked.append(p)
            if node.get(p) is None:
                node[p] = {}
            if not isinstance(node[p], dict):
                where = ".".join(walked)
                raise ConfigError(
                    f"override {dotted}: {where} = {E.show(node[p])} is not a mapping",
                    key=where,
                    value=node[p],
                    allowed="a mapping",
                )
            node = node[p]
        node[last] = value
    return out


def with_overrides(
    data: dict, overrides: list[str], *, source: str = "ftctl.yaml"
) -> tuple[Config, list[str]]:
    """``data`` (ftctl.yaml's mapping, or a job's recorded config) with ``key=value`` overrides applied,
    validated; a ConfigError about a key an override set is blamed on that override (`--set …`)."""
    overrides = list(overrides)
    merged = merge_overrides(data, overrides)
    try:
        return decode_config(merged, source=source)
    except ConfigError as e:
        culprit = blame_override(e.key, overrides)
        if culprit is None:
            raise
        return decode_config(merged, source=f"--set {culprit}")  # the same error, on the override


def override_key(item: str) -> str | None:
    """The dotted key of a 'dotted.key=value' override (None when it is not one)."""
    m = _OVERRIDE.match(item) if isinstance(item, str) else None
    return m.group(1) if m else None


def _covers(key: str, culprit: str) -> bool:
    """Does setting ``key`` touch the dotted path ``culprit`` (itself, a parent or a child)?"""
    return any(
        a == b or a.startswith(b + ".") or a.startswith(b + "[")
        for a, b in ((culprit, key), (key, culprit))
    )


def blame_override(culprit: str, overrides: list[str]) -> str | None:
    """The override (the last one, as the last wins) that set the key a ConfigError names, if any."""
    if not culprit:
        return None
    return next(
        (o for o in reversed(overrides) if (k := override_key(o)) and _covers(k, culprit)), None
    )


def config_to_dict(cfg: Config) -> dict:
    return msgspec.to_builtins(cfg)


# The daemon's settings: read from ftctl.yaml when used, never part of what a job records (a job's
# config is what shapes its training; a webhook URL is a secret and changes nothing in a run).
DAEMON_KEYS = ("notify", "power")


def job_config(cfg: Config) -> dict:
    """What a job records (``job_submitted.config``): the config without the daemon's settings."""
    d = config_to_dict(cfg)
    for k in DAEMON_KEYS:
        d.pop(k, None)
    return d


def config_sha256(cfg: Config) -> str:
    """sha256 of the canonical JSON (sorted keys) of ``job_config(cfg)``, which is what a job
    records, so the hash of the recorded config is this hash."""
    return hashlib.sha256(msgspec.json.encode(job_config(cfg), order="sorted")).hexdigest()


def default_config_dict(model: str) -> dict:
    """Every key with its default value, as a plain dict (for writing a commented ftctl.yaml)."""
    return config_to_dict(Config(model=model))


def describe_keys() -> dict[str, str]:
    """One help line per dotted key: what it does, what it accepts, its default."""
    out: dict[str, str] = {}

    def walk(st: Any, prefix: str) -> None:
        for f in st.fields:
            dotted, desc = E.join(prefix, f.name), E.unwrap(f.type)[2]
            sub = E.struct_member(f.type)
            if sub is not None:
                out[dotted] = desc + (" (default null)" if f.default is None else "")
                walk(sub, dotted)
                continue
            item = E.struct_member(E.list_item(f.type)) if E.list_item(f.type) is not None else None
            # a list of mappings (notify): the list, then each item's keys as key[].name
            if item is not None:
                default = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                out[dotted] = (
                    f"{desc} ({E.allowed(f.type)}; default {E.show(msgspec.to_builtins(default))})"
                )
                walk(item, dotted + "[]")
                continue
            if f.required:
                default = "required"
            else:
                value = f.default if f.default is not msgspec.NODEFAULT else f.default_factory()
                default = "default " + E.show(msgspec.to_builtins(value))
            out[dotted] = f"{desc} ({E.allowed(f.type)}; {default})"

    walk(config_type(), "")
    return out


# Keys that shape an adapter: changing one under an adapter that is not consolidated would make it
# impossible to warm-start from or to fuse. A lineage refuses such a change until it consolidates.
LOCKED_KEYS = (
    "model",
    "fine_tune_type",
    "num_layers",
    "lora_parameters.rank",
    "lora_parameters.keys",
)


def _get(cfg: Config, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def locked_changes(old: Config, new: Config) -> list[str]:
    """``"key: old -> new"`` for every locked key that differs between two resolved configs."""
    return [
        f"{k}: {E.show(_get(old, k))} -> {E.show(_get(new, k))}"
        for k in LOCKED_KEYS
        if _get(old, k) != _get(new, k)
    ]


# --------------------------------------------------------------------------------------------
# Changing a job's recorded config (`ftctl retry JOB --set key=value`): what each change does to a
# resume. Every key a job records is in one of three kinds:
#
# * RESTART_KEYS — a checkpoint cannot be resumed under a new value: the adapter's shape and identity
#   (what the trainer's resume check compares: fine_tune_type, num_layers, lora_parameters), the model,
#   the optimizer's state layout, the seed (the data order and the RNG). Only a job with no committed
#   checkpoint (and no warm start) may change them: it starts from step 0.
# * NEUTRAL_KEYS — change nothing a job computes: how often it reports, evaluates or checkpoints, what
#   it keeps, how it is supervised, where it stops (iters: the steps up to there are the same). A
#   resume is bit-exact with an uninterrupted run.
# * every other key (learning_rate, lr_schedule, batch_size, max_seq_length, …) changes the trajectory
#   from the step it resumes at: deterministic from there, not what the old value would have trained.
RESTART_KEYS = LOCKED_KEYS + (
    "train_mode",  # what the data is (examples or pairs) and what the checkpoint trained
    "lora_parameters.scale",
    "lora_parameters.dropout",
    "optimizer",
    "seed",
)
NEUTRAL_KEYS = (
    "iters",
    "epochs",  # where it stops, as iters (the batches of an epoch do not depend on how many)
    "save_every",
    "steps_per_report",
    "steps_per_eval",
    "val_batches",
    "warm_start",
    "retention",
    "restart",
    "timeouts",
    "min_free_disk_gb",
    "standby",
    "consolidation",
    "metrics",
)


class RecordedConfigError(ValueError):
    """A job's recorded config that cannot run on its model or data (num_layers above the model's
    layers, batch_size above the examples): ``key`` and ``value`` say the override that would."""

    def __init__(self, message: str, key: str, value: Any):
        super().__init__(message)
        self.key, self.value = key, value

    @property
    def fix(self) -> str:
        return f"{self.key}={E.show(self.value)}"


@dataclass(frozen=True)
class Change:
    key: str  # dotted
    old: Any
    new: Any
    effect: str  # "restart" | "trajectory" | "neutral"

    def __str__(self) -> str:
        return f"{self.key}: {E.show(self.old)} -> {E.show(self.new)}"


def _effect(key: str) -> str:
    def under(names):
        return any(key == k or key.startswith(k + ".") for k in names)

    if under(RESTART_KEYS):
        return "restart"
    return "neutral" if under(NEUTRAL_KEYS) else "trajectory"


def config_changes(old: Config, new: Config) -> list[Change]:
    """Every recorded key that differs, at its leaves (``lora_parameters.rank``), with its effect."""
    out: list[Change] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict) and not prefix.endswith("optimizer_config"):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else k)
        elif a != b:
            out.append(Change(prefix, a, b, _effect(prefix)))

    walk(job_config(old), job_config(new), "")
    return out
