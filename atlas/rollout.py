"""The rollout loop: an LLM agent plays episodes in environments, many at once.

Every episode is kept as a :class:`~atlas.data.trajectory.Trajectory` in exactly the format of
the expert data (environment instruction as system prompt, observations as user turns, the
agent's "Thought: ...\\nAction: ..." as assistant turns), so the prompts the model sees here are
rendered the same way as in training, and finished episodes can be saved, inspected and trained
on like any other trajectory.

With ``action_format=tools`` (:class:`ActionFormat`) the agent acts by function calling: the
environment's actions are tools, a turn is its text and one call (written in the chat
template's syntax, e.g. Qwen2.5's ``<tool_call>`` JSON, or atlas's text form), and the
environment's answer is the call's result.

Episodes run in parallel: each turn, the prompts of all active episodes go through one batched
``generate`` call. Environments are pooled per environment, capped by ``instances`` (a
ScienceWorld instance is a JVM of 0.7-3.6 GB), and reused across episodes.

Size: the episode loop, the policy that generates for it (KV reuse, segments, early stops) and
the action formats it reads are one unit: each turn crosses all three.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import StaticCache, StoppingCriteriaList

from atlas.console import progress
from atlas.data.trajectory import Message, ToolCall, Trajectory
from atlas.envs.base import ACTION, Environment, Task, parse_action
from atlas.utils import Choice, ConfigError

log = logging.getLogger(__name__)

FORMAT_HINT = ("Invalid response: no action found. Answer with two lines:\n"
               "Thought: <your reasoning>\nAction: <your action>")


_DECODER = json.JSONDecoder()
_OPENING_BRACE = re.compile(r"\s*\{")


def _call_at(text: str, start: int) -> tuple[str, dict, int] | None:
    """The call whose JSON object starts at ``start``, or None."""
    try:
        obj, _ = _DECODER.raw_decode(text, start)
    except ValueError:
        return None
    if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # OpenAI-style arguments as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except ValueError:
            return None
    return (obj["name"], args, start) if isinstance(args, dict) else None


def parse_call(text: str) -> tuple[str, dict, int] | None:
    """The first tool call written in ``text``, as (name, arguments, where its JSON starts), or
    None. Inside ``<tool_call>`` tags (Qwen2.5 / Hermes, atlas's text form) the object right
    after the first tag that holds one; without tags (Llama-3.1's bare JSON) the first
    top-level object with a ``name``. Arguments are ``arguments`` or ``parameters``. An object
    not yet closed is no call, so decoding goes on until it is."""
    tags = [m.end() for m in re.finditer(r"<tool_call>", text)]
    if tags:
        for end in tags:
            brace = _OPENING_BRACE.match(text, end)
            if brace and (call := _call_at(text, brace.end() - 1)):
                return call
        return None
    pos = text.find("{")
    while pos >= 0:  # top level only: an argument object is never read as a call
        try:
            _, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            return None  # unclosed (still being written) or malformed
        if call := _call_at(text, pos):
            return call
        pos = text.find("{", end)
    return None


ACTION_FORMATS = ("text", "tools")
TOOL_HINT = ("Invalid response: no tool call found. Write your reasoning, then call one of the "
             "tools.")


class ActionFormat:
    """How the agent writes its action, in training data, rollouts and step evaluation.

    - ``text``: "Thought: ...\\nAction: go north" (:func:`parse_action`); observations are user
      turns.
    - ``tools``: the step's text and one call of the environment's tools
      (:attr:`Environment.tools`, read with :func:`parse_call`); the environment's answer is
      the call's ``tool`` result. ``tools_as_text`` renders calls and results into the text
      (:meth:`Trajectory.as_text`) for chat templates without tools, as training does.

    Expert data is generated as text; :meth:`convert` gives its tools form, step for step.
    """

    def __init__(self, kind: str = "text", tools_as_text: bool = False):
        if kind not in ACTION_FORMATS:
            raise ConfigError(f"action_format must be one of {', '.join(ACTION_FORMATS)}, "
                              f"got {kind!r}")
        self.kind, self.tools_as_text = kind, tools_as_text

    @property
    def tools(self) -> bool:
        return self.kind == "tools"

    def complete(self, text: str) -> bool:
        """Whether a response being written already holds its action (decoding can stop)."""
        return parse_call(text) is not None if self.tools else has_complete_action(text)

    def reader(self, env_cls: type[Environment]) -> Callable[[str], str | None]:
        """The canonical action (:meth:`Environment.canonical_action`) of a turn's text."""
        if not self.tools:
            return lambda text: env_cls.canonical_action(env_cls.read_action(text))

        def read(text: str) -> str | None:
            call = parse_call(text)
            return env_cls.canonical_action(call and env_cls.call_to_action(call[0], call[1]))
        return read

    def start(self, task: Task, first: str, env: Environment | type[Environment]) -> Trajectory:
        """An episode's trajectory before its first step (``first``: the goal and observation):
        the environment's system prompt and opening turns, then ``first``."""
        # A placeholder assistant turn satisfies Trajectory's invariant; it is dropped at once.
        opening = [Message(role, text) for role, text in env.opening()]
        trajectory = Trajectory(task.id, task.env, [*opening, Message("user", first),
                                                    Message("assistant", "")],
                                env.system_prompt(self.kind), meta={"source": "rollout"},
                                tools=list(env.tools) if self.tools else None)
        trajectory.messages.pop()
        return trajectory

    def view(self, trajectory: Trajectory) -> Trajectory:
        """What the chat template renders."""
        return trajectory.as_text() if self.tools_as_text else trajectory

    def turn(self, response: str, env_cls: Environment | type[Environment], k: int
             ) -> tuple[Message, str | None]:
        """The assistant message of a response and the action it takes (None: none)."""
        if not self.tools:
            return Message("assistant", response), env_cls.read_action(response)
        call = parse_call(response)
        action = call and env_cls.call_to_action(call[0], call[1])
        if not action:
            return Message("assistant", response), None
        text = re.sub(r"<tool_call>\s*$", "", response[:call[2]]).strip()
        return Message("assistant", text, tool_calls=[ToolCall(call[0], call[1], id=f"call_{k}")]), action

    def observation(self, text: str, step: Message,
                    prefix: str = Environment.observation_prefix) -> Message:
        """The environment's answer to ``step``: the call's result, or a user turn (``prefix``:
        :attr:`Environment.observation_prefix`)."""
        if step.tool_calls:
            c = step.tool_calls[0]
            return Message("tool", text, tool_call_id=c.id, name=c.name)
        return Message("user", prefix + text)

    @property
    def hint(self) -> str:
        return TOOL_HINT if self.tools else FORMAT_HINT

    def convert(self, trajectory: Trajectory, env_cls: type[Environment]) -> Trajectory:
        """An expert trajectory of ``env_cls`` in this format (text data is the source)."""
        if not self.tools or trajectory.has_tool_calls:
            return trajectory
        messages: list[Message] = []
        steps = 0
        for m in trajectory.messages:
            prev = messages[-1] if messages else None
            if m.role == "assistant":
                steps += 1  # ids as the rollout loop gives them: call_<turn>
                action = parse_action(m.content)
                call = action and env_cls.action_to_call(action)
                if call:  # the thought: all before the Action: that parse_action read
                    last = [a for a in ACTION.finditer(m.content)][-1]
                    thought = re.sub(r"^\s*Thought\s*:\s*", "", m.content[:last.start()]).strip()
                    m = dataclasses.replace(m, content=thought, tool_calls=[
                        ToolCall(call[0], call[1], id=f"call_{steps}")])
            elif prev is not None and prev.tool_calls:
                m = self.observation(m.content.removeprefix(env_cls.observation_prefix), prev)
            messages.append(m)
        return dataclasses.replace(trajectory, messages=messages, tools=list(env_cls.tools),
                                   system=env_cls.system_prompt(self.kind),
                                   meta={**trajectory.meta, "action_format": self.kind})


class EpisodeStatus(Choice):
    """How an episode stands or ended (see :class:`Episode`)."""

    RUNNING = "running"
    SUCCESS = "success"
    FAILURE = "failure"  # the environment ended it unsolved
    MAX_TURNS = "max_turns"
    CONTEXT = "context"  # the prompt outgrew max_prompt_tokens
    ERROR = "error"  # the environment crashed


@dataclass
class Episode:
    """One episode under way or finished.

    Attributes:
        task: The task played.
        trajectory: The conversation so far.
        score: Latest score in [0, 1].
        success: Whether the task was solved.
        status: An :class:`EpisodeStatus`; ``error`` holds an ``error`` episode's message.
        invalid: Turns whose response had no parseable action.
    """

    task: Task
    trajectory: Trajectory
    score: float = 0.0
    success: bool = False
    status: EpisodeStatus = EpisodeStatus.RUNNING
    turns: int = 0
    invalid: int = 0
    error: str | None = None
    seconds: float = 0.0
    env: Environment | None = field(default=None, repr=False)

    def record(self) -> dict[str, Any]:
        """The episode's outcome, as written to results files and W&B tables."""
        return {"id": self.task.id, "env": self.task.env, "task": self.task.name,
                "seed": self.task.seed, "split": self.task.split, "success": self.success,
                "score": self.score,
                "status": str(self.status), "turns": self.turns, "invalid_actions": self.invalid,
                "error": self.error, "seconds": round(self.seconds, 3)}


def has_complete_action(text: str) -> bool:
    """Whether ``text`` holds an action on a finished line ("Action: move[ea" may still grow)."""
    finished = text[:text.rfind("\n") + 1]
    if parse_action(finished) is None:
        return False
    # an action that opens a ``` block (SQLGym's "Action: ```sql") ends where the block closes
    return finished[[m.end() for m in ACTION.finditer(finished)][-1]:].count("```") % 2 == 0


def common_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading tokens of ``prompt`` equal ``cached``'s, leaving at least one to feed."""
    n, limit = 0, min(len(cached), len(prompt) - 1)
    while n < limit and cached[n] == prompt[n]:
        n += 1
    return n


def has_sliding_window(model) -> bool:
    """Whether some attention layers of ``model`` see only a window of recent tokens."""
    text = model.config.get_text_config(decoder=True)
    return "sliding_attention" in (getattr(text, "layer_types", None) or ()) or bool(
        getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True))


def prompt_ids(tokenizer, chat: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
    """The token ids of a chat prompt, rendered with the tokenizer's (training) chat template."""
    kw = {"tools": tools} if tools else {}
    return list(tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                              return_dict=False, **kw))


def stop_token_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn (ChatML ``<|im_end|>``, Llama ``<|eot_id|>``, Gemma
    ``<end_of_turn>``) and the EOS token."""
    ends = (tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"))
    return sorted({i for i in ends if isinstance(i, int) and i != tokenizer.unk_token_id}
                  | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))


class ActionLineStop:
    """Stops a row once its response holds a complete ``Action:`` line.

    A model that has not learned to end its turn (a base model, an early checkpoint) would
    otherwise talk on to ``max_new_tokens`` after its action, at the cost of every other row in
    the batch; what it says after the action line is never read.
    """

    def __init__(self, tokenizer, start: int, prefixes: list[str] | None = None,
                 complete: Callable[[str], bool] = has_complete_action):
        self.tokenizer, self.start, self.prefixes = tokenizer, start, prefixes
        self.complete = complete

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        if self.prefixes:  # what each row wrote in earlier segments of the same response
            texts = [p + t for p, t in zip(self.prefixes, texts)]
        done = [self.complete(t) for t in texts]
        return torch.tensor(done, device=input_ids.device)


class Policy:
    """A causal LM that answers chat prompts, a batch at a time (greedy by default).

    Episodes grow by a few hundred tokens a turn, so re-reading the whole conversation every
    turn would dominate the cost. The policy keeps each episode's key/value cache between turns
    (``reuse_cache``) and feeds the model only the tokens a prompt adds to what it has cached:
    the longest common prefix of the new prompt and the cached tokens is reused. Rows of a batch
    are laid out as ``[pad][cached][pad][new]``; positions come from the attention mask, so a
    token's keys and values do not depend on the padding around it.

    Args:
        model: A transformers causal LM (or PEFT model).
        tokenizer: Its tokenizer, with the chat template used in training.
        max_new_tokens: Cap on one response.
        temperature: 0 for greedy decoding.
        top_p: Nucleus sampling mass when sampling.
        reuse_cache: Keep each episode's key/value cache across turns.
        segment: Decode in segments of this many tokens (None: in one go). A batch runs until
            its last row stops, and every row costs a forward at each token, finished or not:
            between segments the rows that have stopped leave the batch, and the others go on
            from their cached keys and values, so a few long responses no longer hold up the
            rest. The tokens are the same as in one go (greedy decoding).
        complete: Whether a response holds its action, so its row can stop
            (:meth:`ActionFormat.complete`).
    """

    def __init__(self, model, tokenizer, max_new_tokens: int = 96, temperature: float = 0.0,
                 top_p: float = 1.0, reuse_cache: bool = True, segment: int | None = None,
                 complete: Callable[[str], bool] = has_complete_action):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.complete = complete
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        if segment is not None and segment < 1:
            raise ValueError(f"segment must be >= 1 or null, got {segment}")
        self.segment = segment
        # Sliding-window layers (Gemma, Mistral v0.1) keep a rolling window, not absolute
        # positions, so a cached prefix cannot be re-inserted into them.
        sliding = has_sliding_window(model)
        if reuse_cache and sliding:
            log.warning("the model has sliding-window attention: KV cache reuse across turns is off")
        self.reuse_cache = reuse_cache and not sliding
        self.cache: dict[str, tuple[list[int], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self.reused_tokens = self.computed_tokens = 0  # prompt tokens read from / fed to the model
        self.stop = stop_token_ids(tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop[0]

    def prompt_ids(self, chat: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        return prompt_ids(self.tokenizer, chat, tools)

    def forget(self, key: str) -> None:
        """Drop an episode's cache (when it ends)."""
        self.cache.pop(key, None)

    def _cached_prefix(self, key: str | None, prompt: list[int]) -> int:
        if not self.reuse_cache or key not in self.cache:
            return 0
        return common_prefix(self.cache[key][0], prompt)

    def generate(self, prompts: list[list[int]], keys: list[str] | None = None,
                 remember: bool = True) -> list[str]:
        """Responses to tokenized prompts, generated as one batch.

        Args:
            prompts: Token ids of each prompt (``prompt_ids``).
            keys: Episode ids; a key's cache from its previous call is reused.
            remember: Keep each key's cache for its next call (False: the caller's cache
                entries are dropped or left as they were).
        """
        n = len(prompts)
        keys = list(keys or [None] * n)
        segment = self.segment if self.reuse_cache else None
        if not segment or segment >= self.max_new_tokens:
            new, _ = self._generate(prompts, keys, remember, self.max_new_tokens)
            return [self._text(g) for g in new]
        temporary = [f"\0row{i}" for i, k in enumerate(keys) if k is None]
        keys = [k if k is not None else f"\0row{i}" for i, k in enumerate(keys)]
        generated: list[list[int]] = [[] for _ in prompts]
        active, budget = list(range(n)), self.max_new_tokens
        while active and budget > 0:
            size = min(segment, budget)
            new, finished = self._generate(
                [prompts[i] + generated[i] for i in active], [keys[i] for i in active],
                True, size, [self.tokenizer.decode(generated[i], skip_special_tokens=True)
                             for i in active])
            for i, g in zip(active, new):
                generated[i] += g
            active = [i for i, done in zip(active, finished) if not done]
            budget -= size
        for key in temporary if remember else keys:
            self.forget(key)
        return [self._text(g) for g in generated]

    def _text(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    @torch.inference_mode()
    def _generate(self, prompts: list[list[int]], keys: list[str | None], remember: bool,
                  max_new_tokens: int, prefixes: list[str] | None = None
                  ) -> tuple[list[list[int]], list[bool]]:
        """One batched ``generate`` call: each row's new tokens (through its stop token) and
        whether it has stopped (a stop token, or a complete action line with ``prefixes``)."""
        device = next(self.model.parameters()).device
        reused = [self._cached_prefix(k, p) for k, p in zip(keys, prompts)]
        L = max(reused)
        N = max(len(p) - r for p, r in zip(prompts, reused))
        rows, mask = [], []
        for p, r in zip(prompts, reused):
            new = p[r:]
            rows.append([self.pad] * (L - r) + p[:r] + [self.pad] * (N - len(new)) + new)
            mask.append([0] * (L - r) + [1] * r + [0] * (N - len(new)) + [1] * len(new))
        self.reused_tokens += sum(reused)
        self.computed_tokens += sum(len(p) - r for p, r in zip(prompts, reused))
        # A static cache: a dynamic one re-copies every row's whole cache at each new token.
        cache = StaticCache(config=self.model.config, max_cache_len=L + N + max_new_tokens)
        if L:
            for layer, (k, v) in zip(cache.layers, self._batch_cache(keys, reused, L, device)):
                layer.update(k, v)
        input_ids = torch.tensor(rows, device=device)
        attention_mask = torch.tensor(mask, device=device)
        sampling = ({"do_sample": True, "temperature": self.temperature, "top_p": self.top_p}
                    if self.temperature > 0 else {"do_sample": False})
        stop = ActionLineStop(self.tokenizer, L + N, prefixes, self.complete)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
            eos_token_id=self.stop, pad_token_id=self.pad, return_dict_in_generate=True,
            use_cache=True, past_key_values=cache,
            disable_compile=True,  # batch and cache sizes change every turn: no recompiles
            stopping_criteria=StoppingCriteriaList([stop]), **sampling)
        new = out.sequences[:, L + N:].tolist()
        gen, finished = [], []
        ends = set(self.stop) | {self.pad}  # rows stopped early are filled with the pad token
        actions = stop(out.sequences, None).tolist()
        for row, action in zip(new, actions):
            cut = next((i + 1 for i, t in enumerate(row) if t in ends), None)
            gen.append(row[:cut] if cut else row)
            finished.append(bool(cut) or action)
        if self.reuse_cache and remember:
            self._keep(keys, prompts, reused, gen, L, N, out.past_key_values)
        return gen, finished

    def _batch_cache(self, keys, reused, L, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer, the cached keys and values of every row, left-padded to length ``L``."""
        first = next(iter(self.cache.values()))[1]  # any cached episode gives the shapes
        layers = []
        for layer in range(len(first)):
            kv = []
            for part in (0, 1):
                ref = first[layer][part]
                t = torch.zeros((len(keys), ref.shape[0], L, ref.shape[2]), dtype=ref.dtype,
                                device=device)
                for b, (key, r) in enumerate(zip(keys, reused)):
                    if r:
                        t[b, :, L - r:] = self.cache[key][1][layer][part][:, :r]
                kv.append(t)
            layers.append(tuple(kv))
        return layers

    def _keep(self, keys, prompts, reused, gen, L, N, cache) -> None:
        """Store each row's keys/values for its real tokens (the cache lacks the last token)."""
        length = int(cache.get_seq_length())
        for b, (key, p, r, g) in enumerate(zip(keys, prompts, reused, gen)):
            if key is None:
                continue
            cols = (list(range(L - r, L)) + list(range(L + N - (len(p) - r), L + N))
                    + list(range(L + N, L + N + len(g))))
            cols = [c for c in cols if c < length]
            index = torch.tensor(cols, device=cache.layers[0].keys.device)
            self.cache[key] = ((p + g)[:len(cols)],
                               [(layer.keys[b].index_select(1, index),
                                 layer.values[b].index_select(1, index))
                                for layer in cache.layers])


class EnvPool:
    """Reusable environment instances, at most ``instances`` per environment name."""

    def __init__(self, factories: dict[str, Callable[[], Environment]], instances: int = 4):
        self.factories, self.cap = factories, instances
        self.idle: dict[str, list[Environment]] = {n: [] for n in factories}
        self.busy: dict[str, int] = {n: 0 for n in factories}
        self.all: list[Environment] = []

    def available(self, name: str) -> bool:
        return bool(self.idle[name]) or self.busy[name] < self.cap

    def acquire(self, name: str) -> Environment:
        if not self.idle[name]:
            env = self.factories[name]()
            self.all.append(env)
            self.idle[name].append(env)
        self.busy[name] += 1
        return self.idle[name].pop()

    def tasks(self, split: str, n: int | dict[str, int]) -> list[Task]:
        """``n`` tasks of ``split`` per environment (or ``n[name]``); the instance that lists
        them stays pooled."""
        tasks = []
        for name in self.factories:
            env = self.acquire(name)
            tasks += env.tasks(split, n[name] if isinstance(n, dict) else n)
            self.release(env)
        return tasks

    def release(self, env: Environment, broken: bool = False) -> None:
        self.busy[env.name] -= 1
        if broken:  # a crashed engine is not trusted with another episode
            self._close(env)
        else:
            self.idle[env.name].append(env)

    def _close(self, env: Environment) -> None:
        try:
            env.close()
        except Exception as e:  # noqa: BLE001 - closing a crashed engine may fail too
            log.warning("closing %s failed: %s", env.name, e)
        self.all.remove(env)

    def close(self) -> None:
        for env in list(self.all):
            self._close(env)


def _step_all(moves: list[tuple[Environment, str]]) -> list[tuple[Any, float]]:
    """Apply each (environment, action): (feedback or the exception it raised, seconds).
    Environments that wait on a server (:attr:`Environment.remote`) are stepped in threads."""
    def step(env: Environment, action: str) -> tuple[Any, float]:
        t0 = time.time()
        try:
            return env.step(action), time.time() - t0
        except Exception as e:  # noqa: BLE001 - an engine crash fails the episode, not the run
            return e, time.time() - t0

    remote = [i for i, (env, _) in enumerate(moves) if env.remote]
    out = [None if env.remote else step(env, action) for env, action in moves]
    if remote:
        with ThreadPoolExecutor(max_workers=min(len(remote), 32)) as threads:
            for i, result in zip(remote, threads.map(lambda i: step(*moves[i]), remote)):
                out[i] = result
    return out  # type: ignore[return-value]


def run_episodes(policy: Policy, pool: EnvPool, tasks: list[Task], batch_size: int = 16,
                 max_turns: int | dict[str, int] | None = None, max_prompt_tokens: int = 4096,
                 on_finish: Callable[[Episode], None] | None = None,
                 actions: ActionFormat | None = None) -> list[Episode]:
    """Play ``tasks`` with ``policy``, up to ``batch_size`` episodes at a time.

    Args:
        policy: The agent.
        pool: Environment instances, by environment name (``task.env``).
        tasks: Episodes to play; results come back in this order.
        batch_size: Episodes generated for in one batch (1: one episode at a time).
        max_turns: Turn bound: one for all environments, or one per environment name; an
            environment's own ``max_turns`` always applies too.
        max_prompt_tokens: An episode whose next prompt is longer ends with status "context".
        on_finish: Called with each finished episode (to save work as it completes).
        actions: How the agent writes its action (default: text).
    """
    actions = actions or ActionFormat()
    if batch_size < 1 or pool.cap < 1:
        raise ValueError(f"batch_size and instances must be >= 1, got {batch_size} and {pool.cap}")
    unknown = sorted({t.env for t in tasks} - set(pool.factories))
    if unknown:
        raise ValueError(f"tasks of unknown environments {unknown}; known: {sorted(pool.factories)}")
    pending: deque[int] = deque(range(len(tasks)))
    episodes: list[Episode | None] = [None] * len(tasks)
    active: list[Episode] = []
    bar = progress(total=len(tasks), desc="episodes", unit="episode")

    def finish(ep: Episode, status: EpisodeStatus, error: str | None = None) -> None:
        ep.status, ep.error = status, error
        policy.forget(ep.task.id)
        ep.trajectory.meta.update(ep.record())
        if ep.env is not None:  # None: its engine never started
            pool.release(ep.env, broken=status == EpisodeStatus.ERROR)
            ep.env = None
        bar.update()
        if on_finish:
            on_finish(ep)

    def start(i: int) -> None:
        task = tasks[i]
        t0 = time.time()
        try:
            env = pool.acquire(task.env)
        except Exception as e:  # noqa: BLE001 - an engine that fails to start fails the episode
            episodes[i] = ep = Episode(task, actions.start(task, "", Environment))
            return finish(ep, EpisodeStatus.ERROR, f"start: {type(e).__name__}: {e}")
        try:
            first, error = env.reset(task), None
        except Exception as e:  # noqa: BLE001 - an engine crash fails the episode, not the run
            first, error = "", f"reset: {type(e).__name__}: {e}"
        episodes[i] = ep = Episode(task, actions.start(task, first, env), env=env,
                                   seconds=time.time() - t0)
        if error:
            finish(ep, EpisodeStatus.ERROR, error)
        else:
            active.append(ep)

    while pending or active:
        # Fill free slots with tasks whose environment has an instance to spare.
        for i in list(pending):
            if len(active) >= batch_size:
                break
            if pool.available(tasks[i].env):
                pending.remove(i)
                start(i)
        if not active:
            continue
        prompts = [policy.prompt_ids(view.chat(), view.tools)
                   for view in (actions.view(ep.trajectory) for ep in active)]
        too_long = [len(p) > max_prompt_tokens for p in prompts]
        for ep, long in zip(active, too_long):
            if long:
                finish(ep, EpisodeStatus.CONTEXT)
        prompts = [p for p, long in zip(prompts, too_long) if not long]
        active[:] = [ep for ep, long in zip(active, too_long) if not long]
        if not active:
            continue
        t0 = time.time()
        responses = policy.generate(prompts, [ep.task.id for ep in active])
        share = (time.time() - t0) / len(active)
        moves: list[tuple[Episode, Message, str | None]] = []
        for ep, response in zip(active, responses):
            ep.turns += 1
            ep.seconds += share
            step, action = actions.turn(response, ep.env, ep.turns)
            ep.trajectory.messages.append(step)
            moves.append((ep, step, action))
        outcomes = iter(_step_all([(ep.env, action) for ep, _, action in moves
                                   if action is not None]))
        for ep, step, action in moves:
            cap = min(ep.env.max_turns, max_turns if isinstance(max_turns, int)
                      else (max_turns or {}).get(ep.task.env, ep.env.max_turns))
            if action is None:
                ep.invalid += 1
                observation, done = actions.hint, False
            else:
                feedback, seconds = next(outcomes)
                if isinstance(feedback, Exception):
                    active.remove(ep)
                    finish(ep, EpisodeStatus.ERROR, f"step {ep.turns}: {type(feedback).__name__}: {feedback}")
                    continue
                ep.seconds += seconds
                ep.score, ep.success = float(feedback.score), bool(feedback.success)
                observation, done = feedback.observation, feedback.done
            if done or ep.turns >= cap:
                ep.trajectory.meta["final_observation"] = observation
                active.remove(ep)
                finish(ep, EpisodeStatus.SUCCESS if ep.success else EpisodeStatus.FAILURE if done
                       else EpisodeStatus.MAX_TURNS)
            else:
                ep.trajectory.messages.append(
                    actions.observation(observation, step, ep.env.observation_prefix))
    bar.close()
    return episodes  # type: ignore[return-value]
