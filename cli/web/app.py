"""`ftctl serve`: the live status page, a presentation layer like the CLI (it calls control/ only).

Starlette app, run by uvicorn. JSON endpoints under /api/, a server-sent-events stream
(/api/events) that says when the journal moved or the daemon lived or died, and static files
(the page and the vendored uPlot) from this package's static/ folder only. Every endpoint is
``async``: they run one at a time on the event loop, which is what the one read-only journal
connection needs. With a token, every request must carry it (``?token=`` or
``Authorization: Bearer``), the page passes its own on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from pathlib import Path

import msgspec
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from starlette.responses import JSONResponse as _JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ftctl.control import metrics
from ftctl.control.dashboard import Viewer
from ftctl.events.errors import UserError

from .. import render

STATIC = Path(__file__).parent / "static"
PULSE_S = 0.5  # how often an open page's stream looks at the journal
HEARTBEAT_S = 15.0  # a comment line keeps proxies from closing an idle stream
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
SQLITE_MAX = (1 << 63) - 1  # a row id or a seq beyond it is no row (and SQLite cannot take it)


class JSONResponse(_JSONResponse):
    """msgspec's encoder: a chart's 10k points encode several times faster than with json.dumps."""

    def render(self, content) -> bytes:
        return msgspec.json.encode(content)


class TokenGate:
    """Pure ASGI middleware (it must not buffer the event stream): 401 without the token."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    async def __call__(self, scope, receive, send):
        if self.token and scope["type"] == "http" and not self._ok(scope):
            await PlainTextResponse(
                "a token is required: open the page with ?token=TOKEN", status_code=401
            )(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _ok(self, scope) -> bool:
        from urllib.parse import parse_qs

        given = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        for k, v in scope.get("headers", []):
            if k == b"authorization" and v.decode().startswith("Bearer "):
                given = v.decode()[7:]
        return hmac.compare_digest(given.encode(), self.token.encode())


def _job_row(v) -> dict:
    j, m = v.job, v.metrics or {}
    good = j.good_checkpoints()
    return {
        "job": j.job,
        "name": j.name,
        "state": j.state,
        "lineage": j.lineage,
        "iters": j.iters,
        "step": v.live_step,
        "global_step": v.live_global_step,
        "loss": m.get("loss"),
        "val_loss": j.last_val_loss,
        "eta_s": v.eta_s,
        "checkpoints": len(good),
        "last_checkpoint_step": good[-1].step if good else None,
        "attempt": j.attempt,
        "crashes": len(j.crashes),
        "stale": v.stale,
        "note": v.note,
        "world_size": j.world_size,
        "hosts": j.hosts or None,
        "rank_tokens_per_s": j.rank_tokens_per_s or None,
        "epoch": v.epoch,
        "result": j.result or None,  # which checkpoint the adapter came from (config `result`)
        "result_step": j.result_step,
        "result_val_loss": j.result_val_loss,
        "stopped_early": j.stopped_early or None,
    }


def _event_row(r) -> dict:
    return {
        "seq": r.seq,
        "ts": r.ts,
        "stream": r.stream,
        "type": type(r.event).kind(),
        "details": render.event_fields(r),
    }


def _series_json(s, full: bool) -> dict:
    pts = s.points
    return {
        "job": s.job,
        "name": s.name,
        "lineage": s.lineage,
        "state": s.state,
        "iters": s.iters,
        "batches_per_epoch": s.batches_per_epoch,  # x = epoch: step / batches_per_epoch
        "counts": s.counts,
        "last_id": s.last_id,
        "full": full,
        "markers": [m.__dict__ for m in s.markers] if full else [],
        # columns, not rows: what the chart takes, and a third of the bytes
        "columns": {
            c: [p[c] for p in pts]
            for c in (
                "global_step",
                "step",
                "attempt",
                "loss",
                "val_loss",
                "lr",
                "tokens_per_s",
                "peak_mem_gb",
                "trained_tokens",
                "superseded",
                "ts",
                *metrics.PAIRS,  # preference training's (dpo, orpo): the pair chart's
                *metrics.VAL_PAIRS,
            )
        },
    }


def allowed_hosts(host: str) -> list[str]:
    """The names a request's Host header may carry (any port): the loopback names, the bound address,
    and for a wildcard bind (0.0.0.0, ::: every interface, only with a token) this machine's own
    names and addresses. Anything else is another site's name pointed at this server: refused."""
    import socket

    names = {*LOOPBACK_NAMES, f"[{host}]" if ":" in host else host}
    if host in ("0.0.0.0", "::"):
        names |= {socket.gethostname(), socket.getfqdn()}
        try:
            import psutil

            for addrs in psutil.net_if_addrs().values():
                for a in addrs:
                    if a.family in (socket.AF_INET, socket.AF_INET6):
                        ip = a.address.split("%")[0]
                        names.add(f"[{ip}]" if ":" in ip else ip)
        except Exception:  # noqa: BLE001 (no interface list: the host names still work)
            pass
    return sorted(n.lower() for n in names if n)


def make_app(ws, token: str | None = None, host: str = "127.0.0.1") -> Starlette:
    viewer = Viewer(ws)

    def fail(e: Exception, code: int = 404) -> JSONResponse:
        return JSONResponse({"error": str(e)}, status_code=code)

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def job_page(request: Request) -> Response:
        return FileResponse(STATIC / "job.html")

    async def compare_page(request: Request) -> Response:
        return FileResponse(STATIC / "compare.html")

    async def api_status(request: Request) -> Response:
        s = viewer.status()
        p = viewer.pulse()
        return JSONResponse(
            {
                "workspace": str(ws.home),
                "seq": s.seq,
                "metric_id": p.metric_id,
                "daemon": render.daemon_json(s.daemon),
                "jobs": [_job_row(v) for v in s.jobs],
                # each lineage's head and branches, as the projection has them (`status --json`)
                "lineages": [
                    {
                        "name": l.name,
                        "head_job": l.head_job,
                        "branches": list(l.branches),
                        "base_version": l.base_version,
                    }
                    for l in s.projection.lineages.values()
                ],
                "hidden": s.hidden,
                "crashes": [
                    {
                        "seq": c.seq,
                        "ts": c.ts,
                        "job": c.job,
                        "category": c.event.category,
                        "step": c.event.step,
                        "exit_code": c.event.exit_code,
                        "signal": render.signal_name(c.event.signal),
                        "evidence": render.evidence_line(c.event.evidence),
                        "evidence_full": c.event.evidence,
                        "fix": c.event.suggestion,
                        "number": c.number,
                        "rank": c.event.rank,
                        "host": c.event.host,
                        "verdict": c.reproduced.event.verdict if c.reproduced else None,
                        "reproduction": c.reproduced.event.summary if c.reproduced else None,
                        "reproduction_seq": c.reproduced.seq if c.reproduced else None,
                    }
                    for c in viewer.crashes()
                ],
                "history": [_event_row(r) for r in viewer.history()],
            }
        )

    async def api_metrics(request: Request) -> Response:
        try:
            after = int(request.query_params.get("after_id", "0"))
            if not 0 <= after <= SQLITE_MAX:
                raise ValueError
            s = viewer.series(
                request.path_params["job"],
                superseded=request.query_params.get("all") == "1",
                after_id=after,
            )
        except ValueError:
            return fail(ValueError("after_id must be a metrics row id (0 or more)"), 400)
        except UserError as e:
            return fail(e)
        return JSONResponse(_series_json(s, full=after == 0))

    async def api_job(request: Request) -> Response:
        try:
            job = request.path_params["job"]
            v = viewer.job_view(job)
            return JSONResponse(
                {
                    "seq": viewer.ledger.state.seq,
                    "job": render.job_json(v.job, v.metrics, v),
                    "events": [_event_row(r) for r in viewer.history(job=job)],
                }
            )
        except UserError as e:
            return fail(e)

    async def api_compare(request: Request) -> Response:
        """The runs table: ?jobs=1,2 or ?lineage=NAME (neither: every job); ?all=1 every config key."""
        q = request.query_params
        jobs = [x for x in q.get("jobs", "").split(",") if x.strip()]
        try:
            c = viewer.compare(jobs, q.get("lineage") or None, all_keys=q.get("all") == "1")
        except UserError as e:
            return fail(e)
        return JSONResponse(c.to_builtins())

    async def api_replay(request: Request) -> Response:
        try:
            to = int(request.query_params.get("to", ""))
            past = viewer.replay(request.path_params["job"], to)
        except ValueError:
            return fail(ValueError("to must be a journal sequence number"), 400)
        except UserError as e:
            return fail(e)
        return JSONResponse({"at_seq": to, **render.job_json(past)})

    async def api_events(request: Request) -> Response:
        async def stream():
            last, quiet = None, 0.0
            while True:
                if await request.is_disconnected():
                    return
                p = viewer.pulse(max_age=PULSE_S)
                now = (p.seq, p.metric_id, p.alive, p.died)
                if now != last:
                    last, quiet = now, 0.0
                    yield f"data: {json.dumps(p.__dict__)}\n\n"
                elif quiet >= HEARTBEAT_S:
                    quiet = 0.0
                    yield ": still here\n\n"
                await asyncio.sleep(PULSE_S)
                quiet += PULSE_S

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    routes = [
        Route("/", index),
        Route("/job/{job}", job_page),
        Route("/compare", compare_page),
        Route("/api/status", api_status),
        Route("/api/events", api_events),
        Route("/api/jobs/{job}", api_job),
        Route("/api/jobs/{job}/metrics", api_metrics),
        Route("/api/jobs/{job}/replay", api_replay),
        Route("/api/compare", api_compare),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        viewer.close()

    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(
                TrustedHostMiddleware, allowed_hosts=allowed_hosts(host), www_redirect=False
            ),
            Middleware(TokenGate, token=token),
        ],
        lifespan=lifespan,
    )
    app.state.viewer = viewer
    return app


def _server(app, host: str, port: int):
    import uvicorn

    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=1,
        )
    )


def bind(host: str, port: int):
    """The listening socket, bound here so that a port in use is a clear error before anything claims
    to serve (uvicorn is then handed the socket)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise UserError(
            f"cannot listen on {host}:{port}: {e.strerror} (another `ftctl serve`?): pick another --port"
        ) from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url(host: str, port: int) -> str:
    return f"http://{host if ':' not in host else '[' + host + ']'}:{port}/"


def run(app, sock) -> None:
    host, port = sock.getsockname()[:2]
    _server(app, host, port).run(sockets=[sock])


def run_in_thread(app, host: str, port: int, wait_s: float = 10.0) -> str:
    """`ftctl start --serve`: the page beside the daemon, on a daemon thread (it ends with the
    process; the daemon's own work never waits on it). Returns the URL once it listens."""
    import threading
    import time

    sock = bind(host, port)
    server = _server(app, host, port)
    t = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="ftctl-serve", daemon=True
    )
    t.start()
    deadline = time.monotonic() + wait_s
    while not server.started and t.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not server.started:
        raise UserError(
            f"the status page could not start on {host}:{port}; the daemon was not started"
        )
    return url(host, sock.getsockname()[1])
