"""Environments served over HTTP: AgentGym's environment servers (the ``agentenv-*`` packages).

AgentGym serves each environment as a FastAPI app; its clients (``agentenv/envs/<env>.py``)
play them through four calls::

    POST /create                       -> {"id": n}  (or a bare n; WebShop, SQLGym)
    POST /reset {"id", "data_idx": i}  -> the first observation
    POST /step  {"id", "action": a}    -> {"observation", "reward", "score", "done"}
    POST /close {"id"}                 (newer servers)

with the per-environment differences their clients encode: the id's name (``id`` or
``env_idx``), the reset fields, where the first observation comes from, which field is the score
(BabyAI's and SciWorld's ``score``, 0-100 in SciWorld; the others' ``reward``), how the action is
read from the model's text, and the conversation each client opens with (the instruction as a
user turn, the model's "OK" reply). :data:`CLIENTS` holds them, copied from AgentGym's v1
clients (github.com/WooooDyy/AgentGym, agentenv/agentenv/envs, f434743); an episode here is the
conversation AgentGym's evaluator builds, so a model trained on AgentTraj data sees the prompts
it was trained on.

``client`` may also name one of atlas's own environment classes (``atlas.envs.maze.MazeEnv``):
then the conversation is that environment's (its system prompt, "Observation: " turns, its
action reading), for an atlas environment served over the same protocol on another machine.

Test tasks are indices (``data_idx``) from config (``indices.test``): a list, a ``"start:stop"``
range or an AgentEval file (``[{"item_id": "webshop_5238"}, ...]``), so held-in and held-out
sets are explicit and reproducible.

Faults: a server that cannot be reached when the environment starts is one error naming its
URL. A request that fails to connect, times out or answers 5xx is retried ``retries`` times with
exponential backoff (urllib3's ``Retry``); after that the episode ends with status ``error`` and
the evaluation goes on; a server found down fails later requests at once for a minute
(:class:`Server`). Note that a retried ``/step`` is sent again: a server that applied the
action before failing to answer applies it twice (AgentGym's servers have no request ids).
At most ``concurrency`` requests are in flight to one server URL at a time, over one pool of
connections that the last environment's ``close()`` ends.

Size: the six AgentGym clients' conversations and wire formats are tables and short readers in
this one module, beside the one HTTP client they share.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests
from hydra.utils import get_class
from omegaconf import OmegaConf
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from atlas.envs.base import Environment, Feedback, Task
from atlas.utils import ConfigError, UserError

log = logging.getLogger(__name__)

OK = "OK. I'll follow your instructions and try my best to solve the task."


class EnvServerError(UserError):
    """An environment server that cannot be reached or answers with an error."""


# ---- how AgentGym's clients read the action from the model's text ---------------------------

def after_action(text: str) -> str:
    """BabyAI, ALFWorld, SciWorld, WebShop (v1): the text after the first "Action:" (up to a
    second one), else the whole text."""
    parts = text.split("Action:")
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


def crafting_action(text: str) -> str:
    """TextCraft: the text after the last "Action:" before any "Instruction:", letters, digits,
    commas and single spaces only."""
    action = text.split("Instruction:")[0].split("Action:")[-1]
    return " ".join(re.sub(r"[^A-Za-z0-9, ]+", "", action).split())


def sql_action(text: str) -> str:
    """SQLGym: the statement in the last ```sql block."""
    return text.split("```sql")[-1].split("```")[0].strip()


# ---- AgentGym's clients ---------------------------------------------------------------------

@dataclass(frozen=True)
class Client:
    """How AgentGym's client for one environment talks to its server and opens its episodes.

    Attributes:
        instruction: The first user turn (``conversation_start``'s human turn).
        reply: The model's answer to it (its gpt turn).
        id_key: The environment id's name in requests (``id`` or ``env_idx``).
        reset: The reset fields, given the task index.
        first: The first observation, from the reset response (and the environment, for a
            ``GET /observation``).
        observation: The step response's observation field.
        score: The step response's score field; ``scale`` divides it into [0, 1].
        success_score: The score (in [0, 1]) at which an episode counts as solved.
        parse: The action of a model turn.
        system: A system prompt (None in AgentGym).
        observation_prefix: Put before every observation after the first.
    """

    instruction: str | None
    reply: str | None = OK
    id_key: str = "id"
    reset: Callable[[int], dict] = lambda i: {"data_idx": i}
    first: Callable[[Any, "AgentGymEnv"], str] = lambda r, env: r["observation"]
    observation: str = "observation"
    score: str = "reward"
    scale: float = 1.0
    success_score: float = 1.0
    parse: Callable[[str], str | None] = after_action
    system: str | None = None
    observation_prefix: str = ""
    create: dict = field(default_factory=dict)


def _alfworld_first(r: dict, env: "AgentGymEnv") -> str:
    return f"{r['observation']}\nAVAILABLE ACTIONS: {','.join(r['available_actions'])}"


def _observe(r: Any, env: "AgentGymEnv") -> str:
    return env.request("GET", "observation", params={env.client.id_key: env.env_id})


CLIENTS: dict[str, Client] = {
    "babyai": Client(
        'You are an exploration master that wants to finish every goal you are given. Every '
        'round I will give you an observation, and you have to respond an action and your '
        'thought based on the observation to finish the given task. You are placed in a room '
        'and you need to accomplish the given goal with actions.\n\nYou can use the following '
        'actions: \n\n- turn right \n\n- turn left \n\n- move forward \n\n- go to <obj> <id> '
        '\n\n- pick up <obj> <id> \n\n- go through <door> <id>: <door> must be an open door. '
        '\n\n- toggle and go through <door> <id>: <door> can be a closed door or a locked door. '
        'If you want to open a locked door, you need to carry a key that is of the same color '
        'as the locked door. \n\n- toggle: there is a closed or locked door right in front of '
        'you and you can toggle it.\nYour response should use the following format:\nThought:'
        '\n<Your Thought>\n\nAction:\n<Your Action>',
        # minigrid's reward for a solved level is 1 - 0.9 * steps / max_steps >= 0.1
        score="score", success_score=0.1),
    "alfworld": Client(
        'Interact with a household to solve a task. Imagine you are an intelligent agent in a '
        'household environment and your target is to perform actions to complete the task '
        'goal. At the beginning of your interactions, you will be given the detailed '
        'description of the current environment and your goal to accomplish. For each of your '
        'turn, you will be given a list of actions which you can choose one to perform in this '
        'turn. You should choose from two actions: "THOUGHT" or "ACTION". If you choose '
        '"THOUGHT", you should first think about the current condition and plan for your '
        'future actions, and then output your action in this turn. Your output must strictly '
        'follow this format:"Thought:\nyour thoughts.\n\nAction:\nyour next action"; If you '
        'choose "ACTION", you should directly output the action in this turn. Your output must '
        'strictly follow this format:"Action:\nyour next action". After your each turn, the '
        'environment will give you immediate feedback based on which you plan your next few '
        'steps. if the envrionment output "Nothing happened", that means the previous action is '
        'invalid and you should try more options.\n Reminder: \n1. the action must be chosen '
        'from the given available actions. Any actions except provided available actions will '
        'be regarded as illegal. \n2. Think when necessary, try to act directly more in the '
        'process.',
        reset=lambda i: {"game": i, "world_type": "Text"}, first=_alfworld_first),
    "sciworld": Client(
        'You are an agent for science world. Every round I will give you an observation, you '
        'have to respond an action based on the observation to finish the given task. Here are '
        'the actions you may take: [{"action": "open/close OBJ", "description": "open/close a '
        'container"}, {"action": "de/activate OBJ", "description": "activate/deactivate a '
        'device"}, {"action": "connect OBJ to OBJ", "description": "connect electrical '
        'components"}, {"action": "disconnect OBJ", "description": "disconnect electrical '
        'components"}, {"action": "use OBJ [on OBJ]", "description": "use a device/item"}, '
        '{"action": "look around", "description": "describe the current room"}, {"action": '
        '"look at OBJ", "description": "describe an object in detail"}, {"action": "look in '
        'OBJ", "description": "describe a container\'s contents"}, {"action": "read OBJ", '
        '"description": "read a note or book"}, {"action": "move OBJ to OBJ", "description": '
        '"move an object to a container"}, {"action": "pick up OBJ", "description": "move an '
        'object to the inventory"}, {"action": "put down OBJ", "description": "drop an '
        'inventory item"}, {"action": "pour OBJ into OBJ", "description": "pour a liquid into a '
        'container"}, {"action": "dunk OBJ into OBJ", "description": "dunk a container into a '
        'liquid"}, {"action": "mix OBJ", "description": "chemically mix a container"}, '
        '{"action": "go to LOC", "description": "move to a new location"}, {"action": "eat '
        'OBJ", "description": "eat a food"}, {"action": "flush OBJ", "description": "flush a '
        'toilet"}, {"action": "focus on OBJ", "description": "signal intent on a task '
        'object"}, {"action": "wait", "description": "take no action for 10 iterations"}, '
        '{"action": "wait1", "description": "take no action for 1 iteration"}, {"action": '
        '"task", "description": "describe current task"}, {"action": "inventory", '
        '"description": "list your inventory"}]\nYour response should use the following '
        'format:\nThought:\nyour thoughts.\n\nAction:\nyour next action',
        first=lambda r, env: f"{r['task_description']}\n{r['observation']}",
        score="score", scale=100.0),
    "textcraft": Client(
        'You are given few useful crafting recipes to craft items in Minecraft. Crafting '
        'commands are of the format "craft [target object] using [input ingredients]".\nEvery '
        'round I will give you an observation, you have to respond an action based on the '
        'state and instruction. You can "get" an object (ingredients) from the inventory or '
        'the environment, look-up the game inventory by "inventory", or "craft" (target) using '
        'any of the crafting commands. You can use ONLY these crafting commands provided, do '
        'not use your own crafting commands. However, if the crafting command uses a generic '
        'ingredient like "planks", you can use special types of the same ingredient e.g. "dark '
        'oak planks" in the command instead.\nYour response should use the following format:'
        '\n\nThought:\n ... \n\nAction:\n ... ',
        parse=crafting_action,
        create={"minecraft_dir": "agentenv_textcraft/", "commands": None, "goal": None}),
    "webshop": Client(
        "You are web shopping.\nI will give you instructions about what to do.\nYou have to "
        "follow the instructions.\nEvery round I will give you an observation and a list of "
        "available actions, you have to respond an action based on the state and instruction."
        "\nYou can use search action if search is available.\nYou can click one of the buttons "
        "in clickables.\nAn action should be of the following structure:\nsearch[keywords]\n"
        "click[value]\nIf the action is not valid, perform nothing.\nKeywords in search are up "
        "to you, but the value in click must be a value in the list of available actions.\n"
        "Remember that your keywords in search should be carefully designed.\nYour response "
        "should use the following format:\n\nThought:\nI think ... \n\nAction: \nclick[something]",
        reply="Ok.", id_key="env_idx", reset=lambda i: {"session_id": i}, first=_observe,
        observation="state"),
    "sqlgym": Client(
        "Given you a description of a SQlite database system, I will ask you a question, then "
        "you should help me operate the SQLite database with SQL to answer the question.\n\n"
        "You have to explain the problem and your solution to me and write down your thoughts."
        "\nAfter thinking and explaining thoroughly, you should give a SQL statement to solve "
        "the question.\n\nyour response should be like this:\nThought: Your thought here.\n\n"
        "Action: ```sql\nSELECT * FROM table WHERE condition;\n```\n\nYou MUST put SQL in "
        "markdown format without any other comments. Your SQL should be in one line. Every "
        "time you can only execute one SQL statement.",
        reply="Ok.", id_key="env_idx", reset=lambda i: {"item_id": i}, first=_observe,
        observation="state", parse=sql_action),
}


def mirror(cls: type[Environment]) -> Client:
    """The client of one of atlas's environments served over AgentGym's protocol: its
    conversation as atlas plays it in process."""
    return Client(None, reply=None, score="score", parse=cls.read_action,
                  system=cls.system_prompt("text"), observation_prefix=cls.observation_prefix)


def client_named(name: str, key: str) -> tuple[Client, type[Environment] | None]:
    """``client=``: an AgentGym environment (:data:`CLIENTS`) or an atlas environment class."""
    if name in CLIENTS:
        return CLIENTS[name], None
    if "." in name:
        try:
            cls = get_class(name)
        except Exception:  # noqa: BLE001 - hydra wraps import errors in several types
            cls = None
        if isinstance(cls, type) and issubclass(cls, Environment) and cls is not AgentGymEnv:
            return mirror(cls), cls
    raise ConfigError(f"{key}={name!r}: not an AgentGym environment ({', '.join(CLIENTS)}) "
                      f"or an atlas environment class (atlas.envs.maze.MazeEnv)")


# ---- task indices ---------------------------------------------------------------------------

def read_indices(spec: Any, key: str) -> list[int]:
    """Task indices: a list of ints, ``"start:stop"``, or an AgentEval file (a JSON list of
    ``{"item_id": "<env>_<index>"}``, as AgentGym's evaluator reads it)."""
    if isinstance(spec, str) and re.fullmatch(r"\s*\d+\s*:\s*\d+\s*", spec):
        start, stop = (int(x) for x in spec.split(":"))
        return list(range(start, stop))
    if isinstance(spec, str):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"{key}={spec!r}: neither a 'start:stop' range nor a file")
        try:
            items = json.loads(path.read_text(encoding="utf-8"))
            return [int(str(item["item_id"]).rsplit("_", 1)[-1]) for item in items]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{key}: {path}: not an AgentEval list of {{\"item_id\": "
                              f"\"<env>_<index>\"}} ({type(e).__name__}: {e})") from None
    if isinstance(spec, (list, tuple)) and all(isinstance(i, int) and i >= 0 for i in spec):
        return list(spec)
    raise ConfigError(f"{key}: expected a list of task indices, 'start:stop' or an AgentEval "
                      f"file, got {spec!r}")


# ---- the environment ------------------------------------------------------------------------

class Server:
    """What the environments on one server URL share in this process: one connection pool
    (``concurrency`` connections, urllib3's retries with backoff), the limit on requests in
    flight, and whether the server was found down. The last environment to close closes the
    connections. A server found down (no connection after the retries) fails requests at once
    for ``DOWN_SECONDS``, so the episodes after a crash do not each wait out the retries; then
    one request tries again."""

    DOWN_SECONDS = 60.0
    _all: dict[str, "Server"] = {}
    _lock = threading.Lock()

    def __init__(self, url: str, concurrency: int, retries: int, backoff: float):
        self.url, self.concurrency, self.users = url, concurrency, 0
        self.limit = threading.BoundedSemaphore(concurrency)
        self._down: tuple[str, float] | None = None  # (why, until when)
        self.session = requests.Session()
        retry = Retry(total=retries, connect=retries, read=retries, status=retries,
                      backoff_factor=backoff, status_forcelist=(500, 502, 503, 504),
                      allowed_methods=None, raise_on_status=True)
        adapter = HTTPAdapter(max_retries=retry, pool_connections=1, pool_maxsize=concurrency)
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, adapter)

    @classmethod
    def of(cls, url: str, concurrency: int, retries: int, backoff: float) -> "Server":
        """The server of ``url`` (one per URL and settings), held until :meth:`release`."""
        with cls._lock:
            key = f"{url} {concurrency} {retries} {backoff}"
            server = cls._all.get(key)
            if server is None:
                server = cls._all[key] = cls(url, concurrency, retries, backoff)
            server.users += 1
            return server

    def release(self) -> None:
        with self._lock:
            self.users -= 1
            if self.users == 0:
                self.session.close()  # (a later environment opens new connections)

    @property
    def down(self) -> str | None:
        """Why the server is taken as down, or None."""
        if self._down and time.monotonic() < self._down[1]:
            return self._down[0]
        return None

    def found_down(self, reason: str) -> None:
        self._down = (reason, time.monotonic() + self.DOWN_SECONDS)


class AgentGymEnv(Environment):
    """An environment on an AgentGym environment server (one environment id on it per
    instance, reset for every episode).

    Args:
        name: The environment's name in results ("webshop").
        url: The server, e.g. ``http://127.0.0.1:36006`` (LMRL-Gym's: ``.../maze``).
        client: Whose conversation and protocol details: an AgentGym environment
            (:data:`CLIENTS`) or an atlas environment class path.
        indices: Task indices by split (``test``, ``train``): a list, ``"start:stop"`` or an
            AgentEval file.
        max_turns: Turn cap of an episode (AgentGym's ``max_rounds``).
        timeout: Seconds to wait for one answer (connecting: at most 10).
        retries: Times a failed request (no connection, timeout, 5xx) is retried.
        backoff: urllib3's backoff factor: the retries wait 0, 2 x, 4 x ... this many seconds.
        concurrency: Requests in flight to this server at a time, over all its environments.
        success_score: The score in [0, 1] that counts as solved (None: the client's; a server
            that answers ``success`` itself is believed).
    """

    action_formats = ("text",)
    has_expert = False
    remote = True

    def __init__(self, name: str, url: str, client: str, indices: Any = None,
                 max_turns: int = 30, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 0.5, concurrency: int = 8, success_score: float | None = None):
        self.client, self.mirrored = client_named(client, f"env {name}: client")
        super().__init__(name, [name if self.mirrored else client], max_turns)
        for key, value, low in (("timeout", timeout, 1e-9), ("retries", retries, 0),
                                ("backoff", backoff, 0), ("concurrency", concurrency, 1)):
            if value is None or value < low:
                raise ConfigError(f"env {name}: {key} must be >= {low:g}, got {value!r}")
        self.url, self.timeout = url.rstrip("/"), (min(timeout, 10.0), timeout)
        indices = OmegaConf.to_container(indices) if OmegaConf.is_config(indices) else indices
        self.indices = dict(indices or {})
        self.success_score = self.client.success_score if success_score is None else success_score
        self.server = Server.of(self.url, concurrency, retries, backoff)
        self.env_id: Any = None
        try:
            created = self.request("POST", "create", dict(self.client.create), with_id=False)
        except EnvServerError as e:
            down = self.server.down
            self.close()
            if down:
                raise EnvServerError(f"env {name}: no environment server at {self.url} ({down})"
                                     ) from None
            raise EnvServerError(f"env {name}: {e}") from None
        self.env_id = created.get(self.client.id_key, created.get("id")) if isinstance(
            created, dict) else created
        if self.env_id is None:
            self.close()
            raise EnvServerError(f"env {name}: {self.url}/create answered {created!r}, without "
                                 f"{self.client.id_key!r}")

    # ---- the conversation ----------------------------------------------------------------
    def system_prompt(self, action_format: str = "text") -> str | None:  # type: ignore[override]
        return self.client.system

    def opening(self) -> list[tuple[str, str]]:  # type: ignore[override]
        c = self.client
        return [] if c.instruction is None else [("user", c.instruction), ("assistant", c.reply)]

    def read_action(self, text: str) -> str | None:  # type: ignore[override]
        return self.client.parse(text)

    @property
    def observation_prefix(self) -> str:  # type: ignore[override]
        return self.client.observation_prefix

    def canonical_action(self, action: str | None) -> str | None:  # type: ignore[override]
        return (self.mirrored or Environment).canonical_action(action)

    # ---- tasks ---------------------------------------------------------------------------
    def tasks(self, split: str, n: int, offset: int = 0) -> list[Task]:
        key = f"env {self.name}: indices.{split}"
        if self.indices.get(split) is None:
            raise ConfigError(f"{key} is not set: give the {split} task indices (a list, "
                              f"'start:stop', or an AgentEval file such as {self.task_names[0]}"
                              f"_test.json from huggingface.co/datasets/AgentGym/AgentEval)")
        indices = read_indices(self.indices[split], key)[offset:]
        if n > len(indices):
            log.warning("%s: %d tasks asked, %d listed: playing those", key, n, len(indices))
        return [Task(self.name, self.task_names[0], i, split) for i in indices[:n]]

    # ---- the protocol --------------------------------------------------------------------
    def request(self, method: str, path: str, body: dict | None = None,
                params: dict | None = None, with_id: bool = True) -> Any:
        """One request (retried by the server's connection pool); the JSON answer. An answer
        that is an error (HTTP >= 400 after retries, ``{"error": ...}`` as AgentGym's servers
        send it, not JSON), or a server found down before, raises :class:`EnvServerError`."""
        url = f"{self.url}/{path}"
        if self.server.down:  # fail fast: every request would wait out its retries again
            raise _error(f"{method} {url}", f"the server is down ({self.server.down})")
        if with_id and method == "POST":
            body = {self.client.id_key: self.env_id, **(body or {})}
        with self.server.limit:
            try:
                r = self.server.session.request(method, url, json=body, params=params,
                                                timeout=self.timeout)
            except requests.RequestException as e:
                reason = _reason(e)
                if reason.startswith("cannot connect"):
                    self.server.found_down(reason)
                raise _error(f"{method} {url}", reason) from None
        if r.status_code >= 400:
            raise _error(f"{method} {url}", f"HTTP {r.status_code}: {r.text[:200]}")
        try:
            data = r.json()
        except ValueError:
            raise _error(f"{method} {url}", f"not JSON: {r.text[:200]!r}") from None
        if isinstance(data, dict) and data.get("error"):
            raise _error(f"{method} {url}", f"the server says: {data['error']}")
        return data

    def reset(self, task: Task) -> str:
        response = self.request("POST", "reset", self.client.reset(int(task.seed)))
        return str(self.client.first(response, self))

    def step(self, action: str) -> Feedback:
        r = self.request("POST", "step", {"action": action})
        if not isinstance(r, dict) or self.client.observation not in r:
            raise _error(f"POST {self.url}/step", f"no {self.client.observation!r} in {r!r}"[:300])
        score = min(max(float(r.get(self.client.score) or 0.0) / self.client.scale, 0.0), 1.0)
        success = r["success"] if isinstance(r.get("success"), bool) else score >= self.success_score
        return Feedback(str(r[self.client.observation]), done=bool(r.get("done")), score=score,
                        success=success)

    def close(self) -> None:
        """Free the environment on the server (newer servers have ``/close``; one try, no
        retries) and, with the server's last environment, its connections."""
        if self.server is None:
            return
        try:
            if self.env_id is not None and not self.server.down:
                requests.post(f"{self.url}/close", json={self.client.id_key: self.env_id},
                              timeout=(min(self.timeout[0], 5.0), 5.0))
        except requests.RequestException:
            pass  # an older server without /close, or one that is gone: nothing to free
        finally:
            self.env_id = None
            self.server.release()
            self.server = None

    def expert_step(self, after_mistake: str | None = None) -> tuple[str, str]:
        raise NotImplementedError(f"{self.name} is played on a server: it has no expert")

    def mistake(self, rng) -> tuple[str, str]:
        raise NotImplementedError(f"{self.name} is played on a server: it has no expert")


def _error(what: str, reason: str) -> EnvServerError:
    e = EnvServerError(f"{what}: {reason}")
    e.reason = reason  # type: ignore[attr-defined]
    return e


def _reason(e: requests.RequestException) -> str:
    """A short reason for a failed request: what urllib3 met last, under the layers of
    exceptions requests and urllib3 wrap it in."""
    chain, cause = [], e
    while isinstance(cause, BaseException) and cause not in chain:
        chain.append(cause)
        cause = getattr(cause, "reason", None) or (cause.args[0] if cause.args else None)
    kinds = {type(c).__name__ for c in chain}
    last = chain[-1]
    kind = ("timed out" if kinds & {"ReadTimeoutError", "ReadTimeout", "TimeoutError"} else
            "too many failed attempts" if "ResponseError" in kinds or isinstance(
                e, requests.exceptions.RetryError) else
            "cannot connect" if kinds & {"NewConnectionError", "ConnectTimeoutError",
                                         "ConnectionRefusedError", "NameResolutionError"} else
            "connection lost" if isinstance(e, requests.ConnectionError) else type(e).__name__)
    return f"{kind}: {last}"[:300]
