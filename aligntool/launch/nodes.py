"""Several nodes: a lost node ends the run on every other node within a bounded time, in one line that names it.

A node that dies (killed, powered off, cut from the network) leaves the others in a collective that gloo or NCCL may
only give up on after their process-group timeout (30 min for gloo), or at once with a wall of tracebacks that do not
say which node went. So, under torchrun with more than one node, each rank runs a ``Watch``: the node's first rank
(LOCAL_RANK 0) beats a counter in the rendezvous store every ``INTERVAL`` seconds (torchrun's TCPStore at
MASTER_ADDR:MASTER_PORT, hosted by node 0's launcher; keys under ``aligntool/nodes/``), and every rank watches the
other nodes' counters. A node whose counter has not moved for ``ALIGNTOOL_NODE_TIMEOUT`` seconds (default 30; on this
node's clock, so clocks need not agree), or whose store cannot be reached (node 0, the store's host), is lost:

- a rank whose collective failed (the peer's sockets closed) waits for that verdict (``verdict``), then ends with
  one line ``aligntool: error: lost node N (host H) ...`` (node-local rank 0 only) and exit code ``EXIT_LOST`` (69);
- a rank whose collective just hangs (no reset reaches it) is ended by the watch thread itself, with the same line.

A node that ended its part (the run finished, or stopped at a preemption checkpoint) says so (``ended``) and is not
watched any more; one whose rank failed says ``failed``, and the others name it: "node N (host H) failed; its log
says why". The bound on a survivor's exit is ALIGNTOOL_NODE_TIMEOUT plus a few seconds (INTERVAL, torchrun's
tear-down). Each node's ranks also die with their launcher (``die_with_parent``): a node whose torchrun is killed
does not leave ranks training on alone.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

EXIT_LOST = 69  # EX_UNAVAILABLE: another node is gone; the run resumes from its last complete checkpoint
EXIT_PEER_FAILED = 1
ENV_TIMEOUT = "ALIGNTOOL_NODE_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
INTERVAL = 1.0
ALIVE_BEATS = 3  # beats a node must add after a failed collective to count as alive
RESUME_HINT = "continue from the last complete checkpoint with --resume on every node"


def timeout_s() -> float:
    from aligntool.errors import UserError

    raw = os.environ.get(ENV_TIMEOUT, "")
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not 3 * INTERVAL <= value <= 86400:
        raise UserError(f"{ENV_TIMEOUT}: {raw!r}; expected the seconds after which a silent node counts as lost "
                        f"({3 * INTERVAL:g} to 86400, default {DEFAULT_TIMEOUT_S:g})")
    return value


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (torchrun's agent) dies. torchrun starts each rank in a
    session of its own, so a SIGKILL to the node's launcher (its process group) would otherwise leave the ranks
    running, training on with nobody to report to."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(EXIT_LOST)


class Watch:
    """The heartbeat of this node and the watch on the others (see the module's docstring)."""

    def __init__(self, node: int, nnodes: int, addr: str, port: int, beats: bool, timeout: float):
        self.node, self.nnodes, self.addr, self.port = node, nnodes, addr, port
        self.beats, self.timeout = beats, timeout
        self.others = [n for n in range(nnodes) if n != node]
        now = time.monotonic()
        self.seen = {n: (-1, now) for n in self.others}  # node -> (last counter, when it last moved)
        self.store_ok = now  # when the store last answered
        self.hosts: dict[int, str] = {}
        self.ended: set[int] = set()
        self.message: str | None = None
        self.code = EXIT_LOST
        self._said = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._store = None
        self._sentinel = None
        self.store_gone = False  # the store's own side closed (node 0's launcher ended)
        self.on_verdict = self._end_now  # what the watch thread does once a node is lost or failed
        self._thread = threading.Thread(target=self._run, name="aligntool-node-watch", daemon=True)

    # ---------------------------------------------------------------------------------------------- the thread
    def start(self) -> Watch:
        self._thread.start()
        return self

    def _connect(self):
        from datetime import timedelta

        import torch.distributed as dist

        store = dist.TCPStore(self.addr, self.port, is_master=False, timeout=timedelta(seconds=max(2.0, INTERVAL * 3)),
                              wait_for_workers=False)
        run = os.environ.get("TORCHELASTIC_RUN_ID", "run")
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"aligntool/nodes/{run}/{attempt}/", store)
        if self.beats:
            store.set(f"host/{self.node}", socket.gethostname())
        if self.node != 0 and self._sentinel is None:  # a bare connection to the store: closed when node 0 goes
            self._sentinel = socket.create_connection((self.addr, self.port), timeout=10)
            self._sentinel.setblocking(False)
        return store

    def _store_closed(self) -> bool:
        if self.store_gone:
            return True
        if self._sentinel is None:
            return False
        try:
            return self._sentinel.recv(1) == b""
        except BlockingIOError:
            return False
        except OSError:  # reset
            return True

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._store_closed():  # node 0's launcher is gone: no more store calls (each would log a C++ trace)
                self.store_gone = True
            else:
                try:
                    if self._store is None:
                        self._store = self._connect()
                    self._tick(self._store)
                    self.store_ok = time.monotonic()
                except Exception:  # the store's host (node 0) unreachable: judged below, by its silence
                    self._store = None
            if self.judge() and not self._stop.is_set():
                self.on_verdict()
            self._stop.wait(INTERVAL)

    def _tick(self, store) -> None:
        if self.beats:
            store.add(f"beat/{self.node}", 1)
        now = time.monotonic()
        for n in self.others:
            if n in self.ended:
                continue
            if store.check([f"state/{n}"]):
                state = store.get(f"state/{n}").decode()
                if state == "failed":
                    self._host(store, n)
                    self._decide(f"node {n}{self._where(n)} failed; its log says why. This node stops too; fix the "
                                 f"cause, then {RESUME_HINT}", EXIT_PEER_FAILED)
                self.ended.add(n)
                continue
            count = store.add(f"beat/{n}", 0)
            if count != self.seen[n][0]:
                self.seen[n] = (count, now)
                self._host(store, n)

    def _host(self, store, n: int) -> None:
        if n not in self.hosts and store.check([f"host/{n}"]):
            self.hosts[n] = store.get(f"host/{n}").decode()

    def _where(self, n: int) -> str:
        host = self.hosts.get(n) or (self.addr if n == 0 else None)
        return f" (host {host})" if host else ""

    def _decide(self, message: str, code: int) -> None:
        with self._lock:
            if self.message is None:
                self.message, self.code = message, code

    def judge(self) -> bool:
        """Whether a node is lost or failed by now (the message is set then)."""
        if self.message is not None:
            return True
        now = time.monotonic()
        silent = [n for n in self.others if n not in self.ended and now - self.seen[n][1] > self.timeout]
        store_lost = self.node != 0 and 0 not in self.ended and (self.store_gone or now - self.store_ok > self.timeout)
        if store_lost:
            silent = sorted({0, *silent})  # the store lives in node 0's launcher
        if silent:
            n = silent[0]
            why = f"no heartbeat for {self.timeout:g} s (killed, or cut off from this node)"
            if n == 0 and self.store_gone:
                why = (f"its rendezvous store at {self.addr}:{self.port} closed (its launcher ended: killed, or its "
                       "run failed)")
            elif n == 0 and store_lost:
                why = f"its rendezvous store at {self.addr}:{self.port} stopped answering for {self.timeout:g} s"
            more = f" (and node{'s' if len(silent) > 2 else ''} {', '.join(map(str, silent[1:]))})" \
                if len(silent) > 1 else ""
            self._decide(f"lost node {n}{self._where(n)}{more}: {why}; this node stops too; {RESUME_HINT}", EXIT_LOST)
        return self.message is not None

    def _end_now(self) -> None:
        """The watch thread's way out of a collective that hangs: the line, then the exit (no Python unwinding)."""
        self.say()
        os._exit(self.code)

    # ----------------------------------------------------------------------------------- the main thread's side
    def say(self) -> None:
        """The one line (node-local rank 0 only; once, whichever thread comes first)."""
        with self._lock:
            said, self._said = self._said, True
        if self.message and not said and os.environ.get("LOCAL_RANK", "0") == "0":
            print(f"aligntool: error: {self.message}", file=sys.stderr, flush=True)

    def verdict(self) -> str | None:
        """After this rank failed: wait (at most the timeout and two beats) until the watch names a lost or failed
        node; None as soon as every other node has beaten ``ALIVE_BEATS`` more times (alive: the failure was this
        node's own). Counted in beats, not by when they were seen: a killed node's last beats may be read only after
        the failure."""
        base = {n: self.seen[n][0] for n in self.others}
        deadline = time.monotonic() + self.timeout + 2 * INTERVAL
        while time.monotonic() < deadline:
            if self.judge():
                return self.message
            if all(n in self.ended or self.seen[n][0] >= base[n] + ALIVE_BEATS for n in self.others):
                return None
            time.sleep(INTERVAL / 4)
        return self.message

    def stop(self, state: str | None) -> None:
        """This node's part is over (``ended``, or ``failed``; None: another node is lost): say so, and stop beating
        and watching."""
        self._stop.set()
        self._thread.join(timeout=INTERVAL * 3)
        if not self.beats or state is None:
            return
        try:
            store = self._store or self._connect()
            store.set(f"state/{self.node}", state)
        except Exception:
            pass


def start_watch() -> Watch | None:
    """A Watch for this rank when it is one of several nodes under torchrun (GROUP_WORLD_SIZE > 1), else None."""
    nnodes = int(os.environ.get("GROUP_WORLD_SIZE", "1"))
    if nnodes < 2 or "MASTER_ADDR" not in os.environ:
        return None
    node = int(os.environ.get("GROUP_RANK", "0"))
    beats = os.environ.get("LOCAL_RANK", "0") == "0"
    return Watch(node, nnodes, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), beats, timeout_s()).start()

