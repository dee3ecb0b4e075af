"""A loopback environment server (a test double): one of atlas's environments behind AgentGym's
HTTP protocol (``POST /create``, ``/reset {"id", "data_idx"}``, ``/step {"id", "action"}``,
``/close``), with faults on demand.

``style`` is the wire format of one of AgentGym's servers: ``agentgym`` (BabyAI's: ``{"id"}``,
``score``), ``webshop`` (a bare id named ``env_idx``, reset ``[observation, null]``, the first
observation from ``GET /observation``, the step's ``state``) or ``sciworld`` (``task_description``
then the observation, scores 0-100).

Task ``data_idx = i`` (WebShop's ``session_id``) is the i-th test task of the environment in process
(``env.tasks("test", i + 1)[i]``), so an episode over HTTP can be compared with the same episode
played in process. Faults:

- ``fail(path, *statuses)``: the next requests to ``path`` answer these HTTP statuses;
- ``stall(path)``: the next request to ``path`` is held (unanswered) until ``release()``;
- ``die_after(path, n)``: after ``n`` requests to ``path``, the server stops and drops every
  connection, as a crashed server does;
- ``gather(path, n)``: the next request to ``path`` is held until ``n`` requests are in flight
  together (or 30 s), so that a test can tell requests sent together from requests sent one by
  one.

Step answers carry ``success`` (atlas's own servers know it; AgentGym's send a score only).

``connections`` counts the connections open now (``wait_closed()`` waits for 0), ``in_flight``
the requests being answered, ``max_in_flight`` the most at a time.
"""

from __future__ import annotations

import socket
import threading
from collections import defaultdict, deque
from typing import Any, Callable

from atlas.envs.base import Environment
from atlas.serving import JSONHandler, QuietHTTPServer


class EnvServer:
    def __init__(self, factory: Callable[[], Environment], style: str = "agentgym"):
        self.factory, self.style = factory, style
        self.envs: dict[int, Environment] = {}
        self.observations: dict[int, str] = {}
        self.lock = threading.Condition()
        self.faults: dict[str, deque] = defaultdict(deque)
        self.counts: dict[str, int] = defaultdict(int)
        self.deaths: dict[str, int] = {}
        self.held = threading.Event()
        self.stalled = threading.Event()  # set when a stalled request has arrived
        self.connections = self.in_flight = self.max_in_flight = 0
        self.sockets: set[socket.socket] = set()
        self.gathering: dict[str, int] = {}
        server = self

        class Handler(JSONHandler):
            def setup(self) -> None:
                super().setup()
                with server.lock:
                    server.connections += 1
                    server.sockets.add(self.connection)

            def finish(self) -> None:
                try:
                    super().finish()
                finally:
                    with server.lock:
                        server.connections -= 1
                        server.sockets.discard(self.connection)
                        server.lock.notify_all()

            def do_GET(self) -> None:
                path, _, query = self.path.strip("/").partition("?")
                if path == "observation":  # ?env_idx=<id> (WebShop, SQLGym)
                    idx = int(query.partition("=")[2])
                    return self.send_json(200, server.observations[idx])
                self.send_json(200, "ok")

            def do_POST(self) -> None:
                body = self.read_json()
                path = self.path.strip("/")
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.counts[path] += 1
                    fault = server.faults[path].popleft() if server.faults[path] else None
                    dying = path in server.deaths and server.counts[path] > server.deaths[path]
                try:
                    if dying:
                        threading.Thread(target=server.kill, daemon=True).start()
                        self.close_connection = True
                        return
                    if fault == "stall":
                        server.stalled.set()
                        server.held.wait(60)
                        self.close_connection = True
                        return  # never answered
                    if fault is not None:
                        return self.send_json(fault, {"detail": f"fault {fault}"})
                    with server.lock:
                        server.lock.notify_all()  # a request waiting for company has it
                        n = server.gathering.pop(path, None)
                        if n:
                            server.lock.wait_for(lambda: server.in_flight >= n, 30)
                    self.send_json(200, server.answer(path, body))
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = QuietHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    # ---- the protocol ----------------------------------------------------------------------
    def answer(self, path: str, body: dict) -> Any:
        key = "env_idx" if self.style == "webshop" else "id"
        if path == "create":
            with self.lock:
                idx = len(self.envs)
                self.envs[idx] = self.factory()
            return idx if self.style == "webshop" else {"id": idx}
        env = self.envs.get(body.get(key))
        if env is None:
            return {"error": f"no environment {body.get(key)}"}
        if path == "reset":
            i = int(body["session_id" if self.style == "webshop" else "data_idx"])
            self.observations[body[key]] = observation = env.reset(env.tasks("test", i + 1)[i])
            if self.style == "webshop":
                return [observation, None]
            if self.style == "sciworld":
                head, _, rest = observation.partition("\n")
                return {"task_description": head, "observation": rest, "score": 0, "done": False}
            return {"observation": observation, "reward": 0.0, "score": 0.0, "done": False}
        if path == "step":
            fb = env.step(body["action"])
            self.observations[body[key]] = fb.observation
            if self.style == "webshop":
                return {"state": fb.observation, "reward": fb.score, "done": fb.done, "info": None}
            scale = 100 if self.style == "sciworld" else 1
            return {"observation": fb.observation, "reward": fb.score, "score": scale * fb.score,
                    "done": fb.done, **({"success": fb.success} if self.style == "agentgym" else {})}
        if path == "close":
            env.close()
            return {"closed": True}
        return {"error": f"no route {path}"}

    # ---- faults ----------------------------------------------------------------------------
    def fail(self, path: str, *statuses: int) -> None:
        self.faults[path].extend(statuses)

    def stall(self, path: str) -> None:
        self.faults[path].append("stall")

    def release(self) -> None:
        self.held.set()

    def gather(self, path: str, n: int) -> None:
        self.gathering[path] = n

    def die_after(self, path: str, n: int) -> None:
        self.deaths[path] = n

    def kill(self) -> None:
        """Stop listening and drop every open connection."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self.lock:
            for s in list(self.sockets):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait_closed(self, timeout: float = 30) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: self.connections == 0, timeout)

    def __enter__(self) -> "EnvServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
        try:
            self.kill()
        except OSError:
            pass
        for env in self.envs.values():
            env.close()
