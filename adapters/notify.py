"""Delivering one notification: the message an event makes, sent by HTTP POST (stdlib urllib) or to
a command's stdin (subprocess), within a timeout. One attempt per call: retries, backoff and the
at-least-once bookkeeping are the caller's (control/notifier.py).
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

from ftctl.core.config import NotifyTarget
from ftctl.events import types as ev
from ftctl.events.types import Recorded

# The names `notify[].events` takes -> the stored tags of the events they mean.
KINDS: dict[str, tuple[str, ...]] = {
    "completed": ("completed",),
    "failed": ("failed",),
    "crashed": ("crashed",),
    "paused": ("paused",),
    "cancelled": ("cancelled",),
    "consolidated": ("base_promoted",),
    "daemon_started": ("daemon_started", "daemon_started.v2"),
    "daemon_stopped": ("daemon_stopped",),
    "alert": ("training_alert",),
}
_URGENT = {"failed", "crashed", "daemon_stopped"}
_NTFY_TAGS = {
    "completed": "white_check_mark",
    "failed": "x",
    "crashed": "boom",
    "paused": "pause_button",
    "cancelled": "wastebasket",
    "base_promoted": "package",
    "daemon_started": "arrow_forward",
    "daemon_stopped": "stop_button",
    "training_alert": "warning",
}


class DeliveryError(Exception):
    """One attempt failed; str() says how (HTTP status, timeout, exit code)."""


def tags(target: NotifyTarget) -> list[str]:
    return [t for name in target.events for t in KINDS[name]]


def summary(r: Recorded) -> tuple[str, str]:
    """(title, text) of an event, for people."""
    e = r.event
    match e:
        case ev.Completed():
            return (
                f"job {e.job} completed",
                f"step {e.step} (global {e.global_step}); adapter {e.adapter_path} sha256 {e.adapter_sha256[:16]}",
            )
        case ev.Failed():
            return f"job {e.job} failed", e.reason
        case ev.Crashed():
            return f"job {e.job} crashed ({e.category}) at step {e.step}", e.suggestion or (
                e.evidence.splitlines()[0] if e.evidence else e.category
            )
        case ev.Paused():
            return f"job {e.job} paused", e.reason
        case ev.Cancelled():
            return f"job {e.job} cancelled", e.reason
        case ev.BasePromoted():
            return f"lineage {e.lineage} consolidated", f"new base v{e.version}: {e.model_path}"
        case ev.DaemonStarted():
            return "daemon started", f"pid {e.process.pid} on {e.host}"
        case ev.DaemonStopped():
            return "daemon stopped", e.reason
        case ev.TrainingAlert():
            return f"job {e.job}: {e.alert.replace('_', ' ')} at step {e.step}", e.text
    return type(e).kind(), ""


def message(
    target: NotifyTarget, r: Recorded, home: str, host: str
) -> tuple[bytes, dict[str, str]]:
    """The body and headers a target gets for event ``r``. ``id`` (json, command) is unique per
    workspace and event: delivery is at least once, so a receiver may see an id twice."""
    title, text = summary(r)
    kind = type(r.event).kind()
    if target.format == "slack" and target.url is not None:
        return json.dumps({"text": f"*ftctl: {title}* — {text} ({home} on {host})"}).encode(), {
            "Content-Type": "application/json"
        }
    if target.format == "ntfy" and target.url is not None:
        return f"{text}\n{home} on {host}".encode(), {
            "Title": f"ftctl: {title}",
            "Tags": _NTFY_TAGS.get(kind, "bell"),
            "Priority": "high" if kind in _URGENT else "default",
        }
    body = {
        "id": f"{home}#{r.seq}",
        "event": kind,
        "seq": r.seq,
        "ts": r.ts,
        "stream": r.stream,
        "workspace": home,
        "host": host,
        "title": title,
        "text": text,
        "data": ev.to_dict(r.event),
    }
    return json.dumps(body).encode(), {"Content-Type": "application/json"}


def deliver(target: NotifyTarget, body: bytes, headers: dict[str, str]) -> None:
    """One attempt; raises DeliveryError. Never longer than about ``target.timeout_s``."""
    if target.command is not None:
        try:
            p = subprocess.run(
                target.command,
                input=body,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                timeout=target.timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise DeliveryError(
                f"the command did not finish within {target.timeout_s:g} s (killed)"
            ) from None
        except OSError as e:
            raise DeliveryError(f"cannot run {target.command[0]!r}: {e.strerror or e}") from None
        if p.returncode != 0:
            err = p.stderr.decode(errors="replace").strip().splitlines()
            raise DeliveryError(
                f"the command exited {p.returncode}" + (f": {err[-1][:200]}" if err else "")
            )
        return
    req = urllib.request.Request(
        target.url, data=body, method="POST", headers={"User-Agent": "ftctl", **headers}
    )
    try:
        with urllib.request.urlopen(req, timeout=target.timeout_s) as resp:
            resp.read(1 << 16)
    except urllib.error.HTTPError as e:
        raise DeliveryError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise DeliveryError(f"cannot reach {target.url}: {e.reason}") from None
    except (TimeoutError, OSError) as e:
        raise DeliveryError(
            f"no answer from {target.url} within {target.timeout_s:g} s"
            if isinstance(e, TimeoutError)
            else f"{target.url}: {e}"
        ) from None
