"""Notifications: committed events sent to the targets of ``notify:`` in ftctl.yaml, by a background
thread of the daemon (never on the path of training or of a commit).

* A notification is a consequence of a committed fact: the thread reads the journal (its own
  connection), never the daemon's in-memory events.
* At least once: each target has a cursor in the journal (the last sequence number it was given,
  ``Journal.set_notify_cursor``), moved only after a delivery. A daemon killed between an event's
  commit and its delivery sends it again at its next start; a clean stop sends what is due first
  (``close`` waits up to ``DRAIN_S``), so a clean restart sends nothing twice.
* A target seen for the first time starts at the journal's end: adding one does not replay history.
* Each delivery is tried ``1 + retries`` times, ``backoff_s`` doubling between tries, each within
  ``timeout_s``; when all fail, a ``notification_failed`` event records it (`ftctl doctor` shows it)
  and the target moves on. Nothing here raises into the daemon.
"""

from __future__ import annotations

import socket
import threading
import traceback
from typing import Callable

from ftctl.adapters import logs, notify
from ftctl.adapters.faults import crash_point
from ftctl.adapters.workspace import Workspace
from ftctl.core.config import NotifyTarget
from ftctl.core.state import DAEMON_STREAM
from ftctl.events import types as ev
from ftctl.events.journal import Journal

POLL_S = 1.0  # how often the thread looks for new events (the daemon also wakes it when it stops)
DRAIN_S = 15.0  # the most a stopping daemon waits for what is due (daemon_stopped included)


class Notifier:
    def __init__(self, ws: Workspace, targets: list[NotifyTarget], say: Callable[[str, str], None]):
        self.ws, self.targets, self.say = ws, list(targets), say
        self.host = socket.gethostname()
        self._wake = threading.Event()
        self._abandon = threading.Event()  # close() gave up waiting: stop between attempts
        self._closing = False
        self._thread: threading.Thread | None = None
        self.journal: Journal | None = None

    def start(self) -> None:
        """Open the thread's own journal connection and start it; new targets begin at the end."""
        if not self.targets:
            return
        self.journal = Journal.open(self.ws.journal_path)
        known, end = self.journal.notify_cursors(), self.journal.last_seq()
        for t in self.targets:
            if t.key() not in known:
                self.journal.set_notify_cursor(t.key(), end, delivered=False)
        self._thread = threading.Thread(target=self._run, name="notifier", daemon=True)
        self._thread.start()

    def close(self, drain_s: float = DRAIN_S) -> None:
        """Send what is due (up to ``drain_s``), then stop; what is left is sent at the next start."""
        if self._thread is None:
            return
        self._closing = True
        self._wake.set()
        self._thread.join(drain_s)
        if self._thread.is_alive():
            self._abandon.set()
            self.say(
                f"notifications: still sending after {drain_s:g} s; the rest is sent at the next start",
                "warn",
            )
            self._thread.join(1.0)
        if not self._thread.is_alive():
            self.journal.close()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        while not self._abandon.is_set():
            # read before the pass: the pass after close() sees daemon_stopped
            closing = self._closing
            try:
                self._pass()
            except Exception as e:  # a bug or a journal problem: say it, never take the daemon down
                self.say(f"notifications: {type(e).__name__}: {e}", "error")
                logs.append(
                    self.ws.logs / "internal-errors.log", "notifier: " + traceback.format_exc()
                )
                if closing:
                    return
                self._wake.wait(10 * POLL_S)
            if closing:
                return
            self._wake.wait(POLL_S)
            self._wake.clear()

    def _pass(self) -> None:
        cursors = self.journal.notify_cursors()
        for t in self.targets:
            after = cursors.get(t.key(), {}).get("seq", 0)
            for r in self.journal.read_kinds(after, notify.tags(t)):
                if self._abandon.is_set():
                    return
                self._send(t, r)

    def _send(self, t: NotifyTarget, r: ev.Recorded) -> None:
        body, headers = notify.message(t, r, str(self.ws.home), self.host)
        error, attempts = "", 0
        for attempt in range(1 + t.retries):
            if attempt:
                if self._abandon.wait(t.backoff_s * 2 ** (attempt - 1)):
                    return  # the daemon is gone: the cursor stays, the next start sends it
            crash_point("notify_before_send", r.seq)
            attempts += 1
            try:
                notify.deliver(t, body, headers)
            except notify.DeliveryError as e:
                error = str(e)
                continue
            self.journal.set_notify_cursor(t.key(), r.seq)
            return
        kind = type(r.event).kind()
        self.say(
            f"notification of event {r.seq} ({kind}) to {t.key()} failed after {attempts} attempt(s): {error}",
            "warn",
        )
        self.journal.append(
            DAEMON_STREAM,
            [
                ev.NotificationFailed(
                    target=t.key(), seq=r.seq, event=kind, attempts=attempts, error=error
                )
            ],
        )
        self.journal.set_notify_cursor(t.key(), r.seq, delivered=False)
