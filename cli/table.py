"""The command table: every `ftctl` command, once — its name, the module that parses and renders it,
its handler, its help line, its --help description and example (docs/cli.md says the same).

``main`` reads this table and imports a command's module only when that command runs (or its --help
is asked, or a completion script is generated): ``ftctl status`` loads nothing of ``ftctl start``.
An entry ``Command(module, handler, …)`` is ``ftctl.cli.<module>``'s ``cmd_<handler>(args, ws) -> int``,
whose arguments ``add_<args or handler>(parser)`` declares (``--home`` is every command's). A ``Group``
is a command with subcommands ("service install"). Adding a command: an entry here, its two functions
in a cli module, the control function it calls, its row in docs/cli.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Command:
    module: str  # ftctl.cli.<module>
    handler: str  # cmd_<handler>(args, ws) -> exit code
    help: str  # one line, for `ftctl --help`
    description: str  # `ftctl COMMAND --help`
    example: str
    args: str = ""  # add_<args>(parser) declares the arguments (default: the handler's name)
    defaults: dict = field(default_factory=dict)  # set on the parsed arguments (action="pause")


@dataclass(frozen=True)
class Group:
    help: str
    description: str
    example: str


COMMANDS: dict[str, Command | Group] = {
    "init": Command(
        "setup",
        "init",
        "create a workspace",
        (
            "Create a workspace: journal.db (the event journal), ftctl.yaml (every key at its default), inbox/, "
            "jobs/, models/, logs/ and run/. Refuses a folder that already holds one."
        ),
        (
            "ftctl init --model ~/models/Qwen2.5-0.5B-Instruct-4bit --home ~/ft\n  ftctl init --model "
            "mlx-community/SmolLM2-135M-Instruct-4bit --home ~/ft   (from the local HF cache)\n  ftctl init --model "
            "~/Downloads/SmolLM2-135M-Instruct.Q4_1.gguf --home ~/ft\n  ftctl init --demo --home ./ftctl-demo"
        ),
    ),
    "submit": Command(
        "jobs",
        "submit",
        "validate a JSONL data file and queue a job",
        (
            "Validate a JSONL data file and queue a job, or reject it naming the bad lines. The file is never "
            "modified: the job trains on its own copy, with ftctl.yaml plus its --set overrides as they are now."
        ),
        "ftctl submit train.jsonl --valid valid.jsonl --set iters=600 --set lora_parameters.rank=16",
    ),
    "lora": Command(
        "lora",
        "lora",
        "mlx_lm.lora's command line, as a crash-proof job (in the foreground)",
        (
            "mlx_lm.lora's command line — its every flag and its -c/--config YAML, with its defaults and "
            "precedence (flags over the file over the defaults) — run as an ftctl job: submitted to the "
            "workspace (created on first use), trained in the foreground by a daemon of its own (or followed "
            "under the one that runs) with its checkpoints committed, killed workers resumed bit for bit, and "
            "the finished adapter published at --adapter-path. Ctrl-C checkpoints and stops; the same command "
            "again resumes the job. ftctl's own keys go in the -c file, ftctl.yaml or --set."
        ),
        (
            "ftctl lora --model ~/models/Qwen3-0.6B --train --data ./data --iters 600 -c lora.yaml\n"
            "  ftctl lora --model mlx-community/SmolLM2-135M-Instruct-4bit --train --test --data ./data "
            "--adapter-path ./adapters --set retention.keep_last=5\n"
            "  ftctl lora --model ~/models/Qwen3-0.6B --test --data ./data --adapter-path ./adapters"
        ),
    ),
    "status": Command(
        "jobs",
        "status",
        "jobs and daemon: the journal, checked against the daemon lock",
        "The jobs and the daemon, as the journal says now; with JOB, everything about one job.",
        "ftctl status\n  ftctl status 3 --json",
    ),
    "history": Command(
        "jobs",
        "history",
        "the event timeline",
        "The event timeline: every recorded fact, oldest first.",
        "ftctl history 3 --crashes\n  ftctl history --follow --json",
    ),
    "replay": Command(
        "jobs",
        "replay",
        "a job's state exactly as it was after event SEQ",
        "A job's state exactly as it was right after journal event SEQ (the seq column of `ftctl history`).",
        "ftctl replay 3 --to 42",
    ),
    "start": Command(
        "daemon",
        "start",
        "run the daemon in the foreground and train the queue",
        (
            "Run the daemon in the foreground: repair what a crash left, then train the queued jobs one at a time "
            "and watch inbox/. Ctrl-C checkpoints the running job and exits; a second Ctrl-C kills the worker."
        ),
        "ftctl start\n  ftctl start --until-idle --quiet --json",
    ),
    "recover": Command(
        "daemon",
        "recover",
        "replay the journal and repair disk and processes to match",
        (
            "Replay the journal and repair the disk and the processes to match it: stale jobs requeued, orphan "
            "workers stopped, temp and uncommitted checkpoints deleted, committed ones verified. Refused while a "
            "daemon runs (it recovered at its start)."
        ),
        "ftctl recover --dry-run",
    ),
    "crashes": Command(
        "crashes",
        "crashes",
        "crashes with category, step, evidence and the suggested fix",
        (
            "Every recorded crash: category, step, exit code, signal, the telling line of the evidence and the "
            "suggested fix."
        ),
        "ftctl crashes\n  ftctl crashes --json",
    ),
    "reproduce": Command(
        "crashes",
        "reproduce",
        "re-run a crash from its last checkpoint: reproduced, or environmental?",
        (
            "Re-run a crash from the last committed checkpoint before it, with the same data (sha256 checked), batch "
            "order, RNG and optimizer state, on a scratch copy: `reproduced` (a property of the run: same failure at "
            "the same step), `not reproduced` (ran cleanly past it: the environment) or `different`. Shows the first "
            "non-finite step and the failing batch (lines of the job's data, token lengths, first characters) and "
            "records only a `crash_reproduced` event."
        ),
        "ftctl reproduce 3\n  ftctl reproduce 3 --crash 1 --trace replay.jsonl\n  ftctl reproduce 3 --step 40",
    ),
    "pause": Command(
        "jobs",
        "control",
        "checkpoint and pause a job",
        (
            "Pause a job. A training job checkpoints first (the daemon acts on it within a second); `ftctl resume "
            "JOB` queues it again."
        ),
        "ftctl pause 3",
        defaults={"action": "pause"},
    ),
    "resume": Command(
        "jobs",
        "control",
        "queue a paused job again",
        "Queue a paused job again; it continues from its last checkpoint.",
        "ftctl resume 3",
        defaults={"action": "resume"},
    ),
    "retry": Command(
        "jobs",
        "control",
        "queue a failed job again: it continues from its last good checkpoint, budget reset",
        (
            "Queue a failed job again (its restart budget spent, a NaN, …): it continues from its last good "
            "checkpoint, bit for bit, with a fresh restart budget. `--set KEY=VALUE` (a failed or paused job) "
            "changes its recorded config first — the remedy when the config is the cause (editing ftctl.yaml "
            "does not change a submitted job): it resumes from its last checkpoint, bit-exact if the keys change "
            "nothing it computes (iters, save_every, retention, timeouts, …), on the new trajectory otherwise "
            "(learning_rate, batch_size, …); a key that changes the adapter's shape, the model, the optimizer "
            "or the seed starts it from step 0, and only if it has no checkpoint yet (else: cancel and submit "
            "again). `--reshard`: a data-parallel job whose hosts changed continues on the new number of ranks "
            "(deterministic, not bit-exact)."
        ),
        "ftctl retry 3 --set num_layers=2",
        args="retry",
        defaults={"action": "retry"},
    ),
    "cancel": Command(
        "jobs",
        "control",
        "cancel a job",
        (
            "Cancel a job for good (a training job is stopped by the daemon within a second). Its committed "
            "checkpoints stay on disk: only its own retention (keep_last, also by `ftctl doctor --fix`) prunes "
            "them, never a consolidation."
        ),
        "ftctl cancel 3",
        defaults={"action": "cancel"},
    ),
    "shutdown": Command(
        "daemon",
        "shutdown",
        "stop the daemon gracefully (checkpoint first)",
        "Ask the running daemon to checkpoint the running job and exit.",
        "ftctl shutdown --wait 60",
    ),
    "consolidate": Command(
        "daemon",
        "consolidate",
        "fuse the lineage's adapter into a new base model",
        (
            "Fuse the lineage's current adapter into a new base model models/vNNNN/ (verified before it is "
            "promoted); new jobs then train a fresh adapter on it. A full fine-tune is promoted as it is: the "
            "base with its trained layers in place, nothing to fuse. With a daemon running, records a request "
            "it carries out when the lineage is idle."
        ),
        "ftctl consolidate --lineage main",
    ),
    "lineage": Group(
        "a lineage's head: which adapter it continues from",
        "A lineage's head: the completed job whose adapter later jobs warm-start from and consolidation fuses.",
        "ftctl lineage set-head 4",
    ),
    "lineage set-head": Command(
        "jobs",
        "set_head",
        "make a completed job the lineage's head (e.g. a branch)",
        (
            "Make a completed job the head of its lineage — e.g. a branch: a job that completed after another one, "
            "started later from the same head, had already become the head."
        ),
        "ftctl lineage set-head 4",
    ),
    "eval": Command(
        "jobs",
        "eval",
        "test loss and perplexity of a job's adapter and of its base model",
        (
            "Did fine-tuning help? Test loss and perplexity of the job's adapter and of its base model on the same "
            "data (the job's validation split by default), recorded as an event and shown by `ftctl status JOB`."
        ),
        "ftctl eval 3\n  ftctl eval 3 --data test.jsonl --json",
    ),
    "config": Group(
        "configuration",
        "Configuration: ftctl.yaml as new jobs will see it.",
        "ftctl config show",
    ),
    "config show": Command(
        "setup",
        "config_show",
        "the effective config and where each value comes from",
        (
            "The effective config for new jobs of a lineage, and where each value comes from (default, ftctl.yaml, "
            "the lineage's promoted base)."
        ),
        "ftctl config show\n  ftctl config show --lineage main --json",
    ),
    "doctor": Command(
        "daemon",
        "doctor",
        "health checks: journal, daemon, processes, disk, checkpoints, drift",
        (
            "Health checks: journal integrity, daemon and lock, orphan workers, disk and memory, checkpoints, "
            "retention, config and data drift. Exits 1 when anything is not ok."
        ),
        "ftctl doctor\n  ftctl doctor --fix",
    ),
    "service": Group(
        "run the daemon as a systemd / launchd service",
        (
            "Run the daemon as a service: a systemd user unit (Linux) or a launchd agent (macOS) that runs `ftctl "
            "start` for this workspace, outlives logouts and reboots, and is restarted when it crashes."
        ),
        "ftctl service install\n  ftctl service install --print --platform macos",
    ),
    "service install": Command(
        "daemon",
        "service",
        "write, enable and start the service for this workspace",
        (
            "Write the unit (or plist) for this workspace — absolute paths of the workspace and of this venv's ftctl "
            "baked in, restart limits from ftctl.yaml's restart: — and enable and start it where systemd or launchd "
            "runs (otherwise it says what to run). Idempotent; never overwrites a file ftctl did not write. "
            "`--print` shows the file and changes nothing."
        ),
        "ftctl service install\n  ftctl service install --print\n  sudo ftctl service install --system",
        args="service_install",
    ),
    "service uninstall": Command(
        "daemon",
        "service",
        "stop (gracefully), disable and remove the service",
        (
            "Stop the service gracefully (the running job checkpoints first), disable it and remove its file. "
            "Idempotent; never removes a file ftctl did not write."
        ),
        "ftctl service uninstall",
        args="service_manage",
    ),
    "service status": Command(
        "daemon",
        "service",
        "whether it is installed, up to date and running",
        (
            "Is a service installed for this workspace, is its file what `install` would write now, and what systemd "
            "or launchd says about it."
        ),
        "ftctl service status --json",
        args="service_manage",
    ),
    "completion": Command(
        "setup",
        "completion",
        "print a shell completion script",
        "Print a shell completion script (subcommands, options, and job ids read live from the journal).",
        (
            "ftctl completion bash > ~/.local/share/bash-completion/completions/ftctl\n  ftctl completion fish > "
            '~/.config/fish/completions/ftctl.fish\n  eval "$(ftctl completion zsh)"'
        ),
    ),
    "demo": Command(
        "setup",
        "demo",
        "the one-minute tour on the embedded tiny model",
        (
            "The one-minute tour on the embedded tiny model: init ./ftctl-demo, submit, train with the worker killed "
            "at STEP, recover, reproduce the crash (a kill is environmental: not reproduced), and compare the "
            "adapter with an uninterrupted run."
        ),
        "ftctl demo\n  ftctl demo --reset --kill-at 5",
    ),
    "metrics": Command(
        "views",
        "metrics",
        "every recorded training point of jobs (loss, val loss, lr, …)",
        (
            "Every training point the journal recorded for the jobs: global step (continuing across warm-started "
            "jobs of a lineage), step, train loss, val loss, learning rate, tokens/s, peak memory, time and attempt. "
            "After a crash and resume, only the effective curve: points the crashed attempt reported past its last "
            "checkpoint were trained again and are hidden (--all shows them, flagged)."
        ),
        "ftctl metrics 3\n  ftctl metrics --lineage main --csv > curves.csv",
    ),
    "compare": Command(
        "views",
        "compare",
        "jobs side by side: the config keys that differ, epochs, losses, result, speed, memory, crashes",
        (
            "Jobs side by side, a row per job, from the journal: the config keys whose values differ between them "
            "(--all: every key), then data file and examples, steps, the epochs those steps make (passes over the "
            "training data, by epochs or by iters alike), final train loss, best and final val loss and their steps, "
            "the published result's step and val loss (config result: best or last), the step early stopping ended "
            "it at (when it did), test loss and perplexity (when tested), mean tokens/s, peak memory, wall time "
            "(first start to end), crashes, resumes and training-health alerts. A figure no job has (no evaluation, "
            "no test, no early stop) is left out. A table wider than the terminal is printed turned (a line per "
            "column) when that is narrower."
        ),
        (
            "ftctl compare 3 4 5\n  ftctl compare --lineage main --sort best_val_loss\n"
            "  ftctl compare --last 4 --csv > runs.csv"
        ),
    ),
    "plot": Command(
        "views",
        "plot",
        "train and val loss against global step, to a PNG or SVG",
        (
            "Draw train loss (lines) and val loss (dots) against global step to a PNG or SVG, one colour per job, "
            "with checkpoints, crashes and resumes marked on the x axis in their job's colour; a job with no loss "
            "recorded yet is left out, none at all is an error (needs the ftctl[plot] extra: matplotlib)."
        ),
        "ftctl plot 3 4 -o loss.png\n  ftctl plot --lineage main -o lineage.svg",
    ),
    "export-tb": Command(
        "views",
        "export_tb",
        "write TensorBoard event files from the journal",
        (
            "Write TensorBoard event files from the journal, one run folder per job (the effective curves), for "
            "`tensorboard --logdir WS/tensorboard` (needs the ftctl[tensorboard] extra: tensorboardX)."
        ),
        "ftctl export-tb\n  ftctl export-tb 3 -o /tmp/tb",
    ),
    "serve": Command(
        "views",
        "serve",
        "a read-only live status page in the browser",
        (
            "A read-only live status page: daemon alive or dead (as `status` says), jobs, loss curves that update "
            "while training, crashes with evidence and fix, the history tail, and each job's replay. Binds to "
            "127.0.0.1; another address only with --token. Answers only requests addressed to the names it was "
            "bound for (127.0.0.1, localhost, [::1], --host): a foreign Host header gets 400 (DNS rebinding). "
            "Needs the ftctl[serve] extra: Starlette, uvicorn."
        ),
        "ftctl serve\n  ftctl serve --port 9000 --host 0.0.0.0 --token s3cret",
    ),
}
