"""Notifications against a real HTTP server on 127.0.0.1: delivered payloads, retry on 500, a timeout
on a server that never answers (recorded, shown by doctor, the daemon not held up), a command target,
and at least once across daemon restarts: nothing twice after a clean restart, a re-send after a
SIGKILL between an event's commit and its delivery."""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from helpers import crash_env, daemon, wait_for

from ftctl.adapters.workspace import Workspace, init_workspace
from ftctl.control.ledger import Ledger
from ftctl.control.notifier import Notifier
from ftctl.core.config import NotifyTarget, decode_config
from ftctl.core.state import DAEMON_STREAM
from ftctl.events import types as ev


class Server:
    """POSTs are recorded; the first ``fail`` answer 500; with ``hang`` none is ever answered."""

    def __init__(self, fail: int = 0, hang: bool = False):
        self.posts: list[dict] = []
        self.raw: list[tuple[dict, bytes]] = []
        self.fail, self.hang, self.seen = fail, hang, 0
        self.release = threading.Event()
        outer = self

        class H(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.seen += 1
                if outer.hang:
                    outer.release.wait(30)
                    return
                if outer.seen <= outer.fail:
                    self.send_response(500)
                    self.end_headers()
                    return
                outer.raw.append((dict(self.headers), body))
                try:
                    outer.posts.append(json.loads(body))
                except ValueError:
                    outer.posts.append({"text": body.decode()})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *a):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    made = []

    def make(**kw):
        made.append(Server(**kw))
        return made[-1]

    yield make
    for s in made:
        s.close()


def _ws(tmp_path, notify: list[dict]) -> Workspace:
    return init_workspace(tmp_path / "ws", "model", {"notify": notify})


def _targets(notify: list[dict]) -> list[NotifyTarget]:
    return decode_config({"model": "m", "notify": notify})[0].notify


def _stop(ledger: Ledger, reason: str) -> int:
    return ledger.commit(DAEMON_STREAM, ev.DaemonStopped(pid=1, reason=reason))[0].seq


def test_a_committed_event_is_delivered_once_with_its_payload_and_the_cursor_moves(
    tmp_path, server
):
    s = server()
    notify = [{"url": s.url, "events": ["daemon_stopped"]}]
    ws = _ws(tmp_path, notify)
    ledger = Ledger(ws.open_journal())
    # history is not replayed
    ledger.commit(DAEMON_STREAM, ev.DaemonStopped(pid=1, reason="before the notifier"))
    n = Notifier(ws, _targets(notify), lambda *a: None)
    n.start()
    seq = _stop(ledger, "ftctl shutdown")
    wait_for(lambda: s.posts, timeout=10)
    n.close()
    [p] = s.posts
    assert p["event"] == "daemon_stopped" and p["seq"] == seq and p["id"] == f"{ws.home}#{seq}"
    assert (
        p["title"] == "daemon stopped"
        and p["text"] == "ftctl shutdown"
        and p["data"]["reason"] == "ftctl shutdown"
    )
    assert ledger.journal.notify_cursors()[_targets(notify)[0].key()]["ok_seq"] == seq


def test_retry_on_500_then_delivered_slack_format(tmp_path, server):
    s = server(fail=2)
    notify = [
        {
            "url": s.url,
            "events": ["daemon_stopped"],
            "format": "slack",
            "retries": 3,
            "backoff_s": 0.01,
        }
    ]
    ws = _ws(tmp_path, notify)
    ledger = Ledger(ws.open_journal())
    n = Notifier(ws, _targets(notify), lambda *a: None)
    n.start()
    _stop(ledger, "ftctl shutdown")
    wait_for(lambda: s.posts, timeout=10)
    n.close()
    assert (
        s.seen == 3
        and len(s.posts) == 1
        and s.posts[0]["text"].startswith("*ftctl: daemon stopped*")
    )
    ledger.refresh()
    assert ledger.state.daemon.notify_failed == {}


def test_a_server_that_never_answers_times_out_is_recorded_and_shown_by_doctor(tmp_path, server):
    s = server(hang=True)
    notify = [
        {
            "url": s.url,
            "events": ["daemon_stopped"],
            "timeout_s": 0.3,
            "retries": 1,
            "backoff_s": 0.01,
        }
    ]
    ws = _ws(tmp_path, notify)
    ledger = Ledger(ws.open_journal())
    said = []
    n = Notifier(ws, _targets(notify), lambda text, level="info": said.append(text))
    n.start()
    seq = _stop(ledger, "ftctl shutdown")
    wait_for(lambda: ledger.refresh() or ledger.state.daemon.notify_failed, timeout=60, every=0.05)
    # recorded while the server still holds both requests unanswered: each attempt gave up by its
    # own timeout_s, nothing the server did ended it
    assert s.seen == 2 and not s.release.is_set(), s.seen
    n.close()
    [failure] = ledger.state.daemon.notify_failed.values()
    assert failure.seq == seq and failure.attempts == 2 and "within 0.3 s" in failure.error, failure
    assert any("failed after 2 attempt(s)" in t for t in said)
    from ftctl.control import doctor

    finding = next(f for f in doctor.examine(ws, ledger) if f.check == "notifications")
    assert finding.severity == "warning" and f"event {seq} (daemon_stopped" in finding.message


def test_a_command_target_gets_the_event_as_json_on_stdin(tmp_path):
    out = tmp_path / "got.json"
    notify = [
        {
            "command": [
                sys.executable,
                "-c",
                f"import sys; open({str(out)!r}, 'wb').write(sys.stdin.buffer.read())",
            ],
            "events": ["daemon_stopped"],
        }
    ]
    ws = _ws(tmp_path, notify)
    ledger = Ledger(ws.open_journal())
    n = Notifier(ws, _targets(notify), lambda *a: None)
    n.start()
    seq = _stop(ledger, "bye")
    wait_for(lambda: out.exists() and out.stat().st_size, timeout=15)
    n.close()
    assert json.loads(out.read_text())["seq"] == seq


def test_at_least_once_across_restarts(tmp_path, server):
    """Three real daemons: a clean run (both events sent), one SIGKILLed just before its first send,
    and a clean run that sends what the killed one had not — and nothing of the first run again."""
    s = server()
    notify = [{"url": s.url, "events": ["daemon_started", "daemon_stopped"], "backoff_s": 0.05}]
    ws = _ws(tmp_path, notify)
    seqs = lambda: [p["seq"] for p in s.posts]  # noqa: E731

    d = daemon(ws.home, "--until-idle")
    assert d.wait(60) == 0, d.stderr.read()
    first = seqs()
    assert [p["event"] for p in s.posts] == ["daemon_started", "daemon_stopped"]

    d = daemon(ws.home, "--until-idle", env=crash_env(tmp_path, "notify_before_send:*"))
    assert d.wait(60) == -9
    # killed before it sent anything: its events are committed, not delivered
    assert seqs() == first
    with ws.open_journal() as j:
        undelivered = [
            r.seq for r in j.read(after=first[-1]) if type(r.event).kind() in ("daemon_started",)
        ]
    assert undelivered

    d = daemon(ws.home, "--until-idle")
    assert d.wait(60) == 0, d.stderr.read()
    got = seqs()
    # the clean restart sent nothing twice
    assert got[:2] == first and len(got) == len(set(got)), got
    assert set(undelivered) <= set(got[2:]), (
        undelivered,
        got,
    )  # the killed daemon's events are sent after all
    kinds = [p["event"] for p in s.posts[2:]]
    assert kinds.count("daemon_started") == 2 and kinds.count("daemon_stopped") == 2, kinds


def test_notify_config_errors_are_one_line(tmp_path):
    from ftctl.core.config import ConfigError

    for bad, text in (
        ([{}], "needs exactly one of url or command"),
        ([{"url": "ftp://x"}], "http:// or https://"),
        ([{"url": "http://x", "events": ["done"]}], "must be one of"),
        ([{"url": "http://x", "command": ["x"]}], "exactly one"),
    ):
        with pytest.raises(ConfigError, match=text):
            decode_config({"model": "m", "notify": bad})
