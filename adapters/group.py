"""A data-parallel worker group: MLX's launcher (mlx.launch) starting the ranks, and their lines to us.

* The daemon listens on a TCP port (127.0.0.1 when every host is local); each rank connects to it
  (FTCTL_CONTROLLER, with a per-launch token), says Hello, gets the plan and speaks the worker
  protocol (protocol.py) over that one connection. A rank's death closes its connection (the kernel
  does it, even for SIGKILL): the daemon sees it at once. The daemon's death or its closing of the
  connection makes a rank exit at once (worker.py), on any host.
* mlx.launch runs in its own session (so its own process group, which every local rank inherits) and
  dies with the daemon (PR_SET_PDEATHSIG); each local rank also dies with mlx.launch. Tearing the group
  down = SIGKILL to that process group, then closing every connection (remote ranks exit on the EOF).
"""

from __future__ import annotations

import ipaddress
import os
import random
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ftctl.core.config import LOCAL_HOSTS, Config, world_size
from ftctl.events.types import ProcessId

from . import logs, system
from . import protocol as P
from .process import _die_with_parent, identity, stopped


class GroupError(ValueError):
    """The distributed config cannot be launched (hostfile unreadable, hosts unusable)."""


@dataclass(frozen=True)
class Layout:
    hosts: list[str]  # one entry per rank, in rank order (ssh names)
    world_size: int
    local: bool  # every rank runs on this machine


def read_hostfile(path: str) -> list[str]:
    """The ssh names of an mlx.launch JSON hostfile, one per rank (MLX's own parser)."""
    from mlx._distributed_utils.common import Hostfile

    try:
        hf = Hostfile.from_file(path)
    except ValueError as e:
        raise GroupError(f"distributed.hostfile: {e}") from None
    if not hf.hosts:
        raise GroupError(f"distributed.hostfile {path} lists no hosts")
    return [h.ssh_hostname for h in hf.hosts]


def layout(cfg: Config) -> Layout:
    """Where the ranks run, from the config (and the hostfile, read now: it may change between attempts)."""
    d = cfg.distributed
    if d is None:
        return Layout(hosts=["127.0.0.1"], world_size=1, local=True)
    if d.hosts is not None:
        hosts = [h for h in d.hosts for _ in range(d.processes_per_host)]
    else:
        hosts = read_hostfile(d.hostfile)
    n = world_size(cfg, len(hosts))
    return Layout(hosts=hosts, world_size=n, local=all(h in LOCAL_HOSTS for h in hosts))


def problems(cfg: Config) -> list[str]:
    """What makes a distributed config unusable here, checked cheaply (no ssh): the hostfile parses,
    the batch splits over the ranks, ring hosts are IP addresses, host names resolve."""
    d = cfg.distributed
    if d is None:
        return []
    try:
        lay = layout(cfg)
    except GroupError as e:
        return [str(e)]
    out = []
    if cfg.batch_size % lay.world_size:
        out.append(
            f"batch_size = {cfg.batch_size} is not a multiple of the world size {lay.world_size}: each rank "
            "takes batch_size / world size examples of every batch"
        )
    if d.hosts is not None and d.backend in ("ring", "any"):
        for h in sorted(set(d.hosts)):
            if h == "localhost":
                continue
            try:
                ipaddress.ip_address(h)
            except ValueError:
                out.append(
                    f"distributed.hosts: {h!r} is not an IP address; the ring backend needs IPs (use a "
                    "hostfile to give ssh names with their ips)"
                )
    for h in sorted(set(lay.hosts) - set(LOCAL_HOSTS)):
        try:
            socket.getaddrinfo(h, None)
        except OSError as e:
            out.append(f"distributed: host {h!r} does not resolve ({e})")
    if not out and not this_machine(lay.hosts[0]):
        out.append(
            f"distributed: the first host ({lay.hosts[0]!r}, rank 0) must be this machine: rank 0 writes the "
            "checkpoints into the workspace, which lives here"
        )
    return out


def this_machine(host: str) -> bool:
    """Whether ``host`` names this machine: a loopback name, its host name, or an address it can bind."""
    if host in LOCAL_HOSTS or host in (socket.gethostname(), socket.getfqdn()):
        return True
    try:
        addrs = {a[4][0] for a in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    for ip in addrs:
        try:
            with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
                s.bind((ip, 0))
            return True
        except OSError:
            continue
    return False


def blas_threads(lay: Layout, env: dict) -> str | None:
    """BLAS threads per rank when several ranks share this machine (its cores divided among them), unless
    the user set them; None to leave them as they are."""
    local = sum(h in LOCAL_HOSTS for h in lay.hosts)
    if local < 2 or any(
        k in env or k in os.environ for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
    ):
        return None
    return str(max(1, system.usable_cores() // local))


@dataclass
class Rank:
    """A connected rank: who it is and its connection (what it says is the supervisor's business)."""

    rank: int
    sock: socket.socket
    pid: int = 0
    host: str = ""
    buf: bytes = b""
    closed: bool = False


@dataclass
class Group:
    """The launcher and its ranks: the supervisor polls, signals and ends it as it does process.Worker
    (a single worker is a group of one)."""

    proc: subprocess.Popen  # mlx.launch
    id: ProcessId
    listener: socket.socket
    token: str
    layout: Layout
    log_path: Path
    log_offset: int
    plan_json: bytes
    ranks: dict[int, Rank] = field(default_factory=dict)
    pending: list[socket.socket] = field(default_factory=list)  # accepted, no Hello yet
    pending_buf: dict = field(default_factory=dict)
    backend: str = "any"
    killed: bool = False

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    def poll(self, timeout: float) -> list[P.Heard]:
        """New connections (each says which rank it is, then gets the plan), the ranks' messages, and
        their connections closing: a rank's death closes it (the kernel does, even for SIGKILL)."""
        if self.killed:
            return []
        socks = [
            self.listener,
            *self.pending,
            *(r.sock for r in self.ranks.values() if not r.closed),
        ]
        try:
            ready, _, _ = select.select(socks, [], [], timeout)
        except (OSError, ValueError):
            return []  # a socket closed under us: the group was torn down
        out: list[P.Heard] = []
        for s in ready:
            if s is self.listener:
                accept(self)
            elif s in self.pending:
                out += self._read_pending(s)
            else:
                out += self._read_rank(next(r for r in self.ranks.values() if r.sock is s))
        return out

    def _read_pending(self, s: socket.socket) -> list[P.Heard]:
        chunk = _recv(s)
        if chunk is None:
            return []
        buf = self.pending_buf.get(s, b"") + chunk
        if chunk and b"\n" not in buf:
            self.pending_buf[s] = buf
            return []
        self.pending.remove(s)
        self.pending_buf.pop(s, None)
        line, _, rest = buf.partition(b"\n")
        got = hello(self, s, line) if chunk else "closed before saying which rank it is"
        if isinstance(got, str):
            s.close()
            return [P.Heard(None, problem=f"refused a connection: {got}")]
        got.buf = rest
        return [P.Heard(got.rank, connected=True), *self._lines(got)]

    def _read_rank(self, r: Rank) -> list[P.Heard]:
        chunk = _recv(r.sock)
        if chunk is None:
            return []
        if not chunk:
            r.closed = True
            return [P.Heard(r.rank, closed=True)]
        r.buf += chunk
        return self._lines(r)

    def _lines(self, r: Rank) -> list[P.Heard]:
        heard, r.buf = P.heard_lines(r.rank, r.buf)
        return heard

    def who(self, rank: int) -> tuple[int, str]:
        r = self.ranks.get(rank)
        return (r.pid, r.host) if r else (0, "")

    def stopped_ranks(self) -> list[int]:
        """Local ranks stopped by a signal (SIGSTOP, SIGTSTP): the usual cause of a group that hangs."""
        pids = self.local_pids()
        halted = set(stopped(list(pids.values())))
        return [rank for rank, pid in pids.items() if pid in halted]

    def ended(self) -> bool:
        """mlx.launch exited (its ranks' last lines and EOFs may still be unread)."""
        return self.proc.poll() is not None

    def finish(self) -> int | None:
        """The attempt is over: nothing of the group may outlive it. None: a rank's own exit status is
        not ours to read (it is mlx.launch's child, possibly on another host)."""
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a launcher that outlives its ranks is killed below
            pass
        self.close()
        self.proc.wait()
        return None

    def send(self, line: bytes) -> None:
        for r in self.ranks.values():
            _send(r.sock, line)

    def kill_group(self) -> None:
        """SIGKILL mlx.launch's process group (every local rank), then close every connection: a rank on
        another host exits on the EOF."""
        self.killed = True
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for s in [*self.pending, *(r.sock for r in self.ranks.values())]:
            try:
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self.kill_group()
        try:
            self.listener.close()
        except OSError:
            pass
        try:
            self.proc.stdin.close()
        except (OSError, ValueError, AttributeError):
            pass

    def local_pids(self) -> dict[int, int]:
        """rank -> pid of the ranks that run on this machine."""
        return {
            r.rank: r.pid for r in self.ranks.values() if r.pid and r.host == socket.gethostname()
        }


def _recv(s: socket.socket) -> bytes | None:
    """What a connection has (b"": it closed), None when nothing is there after all."""
    try:
        return s.recv(1 << 16)
    except BlockingIOError:
        return None
    except OSError:
        return b""


def _send(sock: socket.socket, line: bytes) -> None:
    try:
        sock.sendall(line.rstrip(b"\n") + b"\n")
    except OSError:
        pass


def _free_ports(n: int) -> int:
    """A base port with n free ports after it on this machine (the ring backend's listeners)."""
    for _ in range(50):
        base = random.randrange(20000, 60000 - n)
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise GroupError("no free TCP ports for the ring backend")


def launcher() -> list[str]:
    """mlx.launch, run by this very Python (the console script beside it, else MLX's module)."""
    script = Path(sys.executable).parent / "mlx.launch"
    if script.exists():
        return [sys.executable, str(script)]
    return [
        sys.executable,
        "-c",
        "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
    ]


def launch(
    plan: P.TrainPlan,
    cfg: Config,
    log_path: Path,
    env: dict | None = None,
    label: tuple[str, str] = ("", ""),
) -> Group:
    """Start the ranks with mlx.launch; they connect back to the returned Group's listener."""
    d = cfg.distributed
    lay = layout(cfg)
    bind = "127.0.0.1" if lay.local else ""
    listener = socket.create_server((bind, 0), backlog=max(8, lay.world_size))
    listener.setblocking(False)
    port = listener.getsockname()[1]
    controller = "127.0.0.1" if lay.local else (d.controller or socket.gethostname())
    token = secrets.token_hex(16)
    extra = {
        **(env or {}),
        "FTCTL_CONTROLLER": f"{controller}:{port}",
        "FTCTL_GROUP_TOKEN": token,
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [*launcher(), "--backend", "ring" if d.backend == "any" else d.backend]
    if d.hostfile is not None:
        cmd += ["--hostfile", d.hostfile]
    else:
        cmd += [
            "--hosts",
            ",".join("127.0.0.1" if h == "localhost" else h for h in d.hosts),
            "-n",
            str(d.processes_per_host),
        ]
    if d.backend in ("ring", "any"):
        cmd += ["--starting-port", str(_free_ports(lay.world_size))]
    for k, v in extra.items():  # remote ranks get only what --env passes
        cmd += ["--env", f"{k}={v}"]
    cmd += [
        "--",
        sys.executable,
        "-m",
        "ftctl.adapters.worker",
        "--connect",
        "--job",
        label[0],
        "--workspace",
        label[1],
    ]
    log_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    logs.rotate(log_path)
    log = open(log_path, "ab", buffering=0)
    os.chmod(log_path, 0o600)
    offset = log.tell()
    log.write(
        f"mlx.launch: {lay.world_size} ranks on {', '.join(lay.hosts)}, backend {d.backend}\n".encode()
    )
    # stdin: a pipe only we hold (mlx.launch forwards its stdin to the ranks; /dev/null would make it spin)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=log,
        stderr=log,
        start_new_session=True,
        preexec_fn=_die_with_parent,
        env={**os.environ, **extra},
    )
    log.close()
    started = identity(proc.pid) or ProcessId(pid=proc.pid, started_at=time.time())
    return Group(
        proc=proc,
        id=started,
        listener=listener,
        token=token,
        layout=lay,
        log_path=log_path,
        log_offset=offset,
        plan_json=plan_json_line(plan),
        backend=d.backend,
    )


def plan_json_line(plan: P.TrainPlan) -> bytes:
    return P.encode(plan)


def accept(g: Group) -> None:
    """Take the connections waiting on the listener (their Hello comes later)."""
    while True:
        try:
            s, _ = g.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        g.pending.append(s)


def hello(g: Group, s: socket.socket, line: bytes) -> Rank | str:
    """A pending connection's first line: the rank it is (and the plan sent to it), or why it was refused."""
    try:
        msg = P.decode_message(line)
    except P.ProtocolError as e:
        return f"not a rank: {e}"
    if not isinstance(msg, P.Hello) or msg.token != g.token:
        return "a connection without this launch's token"
    if not 0 <= msg.rank < g.layout.world_size or msg.rank in g.ranks:
        return f"rank {msg.rank} is not expected (world size {g.layout.world_size}, connected {sorted(g.ranks)})"
    r = Rank(rank=msg.rank, sock=s, pid=msg.pid, host=msg.host)
    g.ranks[msg.rank] = r
    s.setblocking(True)
    _send(s, g.plan_json)
    s.setblocking(False)
    return r
