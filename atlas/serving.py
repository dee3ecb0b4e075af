"""Rollouts through an inference server: ``eval.backend=server``.

The rollout loop (:func:`atlas.rollout.run_episodes`) asks a policy for each turn. With
``eval.backend=hf`` that is :class:`atlas.rollout.Policy`, transformers' ``generate`` in this
process; with ``eval.backend=server`` it is :class:`ServerPolicy`, which sends the same prompts
to an OpenAI-compatible completions endpoint (vLLM, SGLang, llama.cpp's ``llama-server``: servers that take token-id prompts):

- The prompt is rendered here, with the run's tokenizer and chat template exactly as training
  rendered it, and sent as **token ids** (the completions API takes a list of ints): the server
  neither applies a template nor adds a BOS of its own, so nothing changes but the engine.
- A turn ends where it ends in this process: at the model's end-of-turn tokens (sent as
  ``stop_token_ids``; servers that do not know the field stop at their EOS) or as soon as the
  streamed response holds a complete action (:meth:`ActionFormat.complete`): the client closes
  the stream there and keeps the text up to that chunk, as ``Policy`` does (servers stream a
  token a chunk; with several tokens a chunk, e.g. speculative decoding, a little more).
- Every prompt of a batch is in flight at once (``eval.server.concurrency`` requests), so the
  engine batches them; raise ``eval.batch_size`` for more episodes in flight.

:class:`InferenceServer` either uses a server the user runs (``eval.server.base_url``) or starts
one from a command template (``eval.server.command="vllm serve {model} --port {port}"``), waits
until it answers, and stops it (its whole process group, by PID) when the evaluation ends.

``python -m atlas.serving --model DIR --port N`` is a small reference server of the same API for
a transformers model (greedy or sampled, one request at a time): the tests serve the tiny model
through it, and it shows what the client expects. It is not an inference engine.

Size: the client, the server it starts and the reference server speak one wire format, kept
in one module so that the two sides cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from atlas.utils import ConfigError, UserError

log = logging.getLogger(__name__)

BACKENDS = ("hf", "server")
PLACEHOLDERS = ("model", "port", "adapter", "python")


class ServerError(UserError):
    """The inference server failed to start, or a request to it failed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class InferenceServer:
    """An OpenAI-compatible server for the length of a ``with`` block.

    Args:
        base_url: A running server's API root (``http://host:8000/v1``); nothing is started.
        command: Otherwise, the command that starts one; ``{model}``, ``{port}``, ``{adapter}``
            and ``{python}`` (this interpreter) are filled in. It runs in its own process
            group, its output goes to ``log_file``, and the group is stopped on exit.
        model: What ``{model}`` stands for (a model directory or hub id).
        adapter: What ``{adapter}`` stands for (a LoRA adapter directory, or empty).
        port: What ``{port}`` stands for (None: a free port).
        startup_timeout: Seconds to wait for the started server to answer ``GET /models``.
        log_file: Where the started server's output goes.
    """

    def __init__(self, base_url: str | None = None, command: str | None = None,
                 model: str = "", adapter: str = "", port: int | None = None,
                 startup_timeout: float = 600, log_file: str | Path | None = None,
                 api_key: str | None = None):
        if bool(base_url) == bool(command):
            raise ConfigError("eval.backend=server needs exactly one of eval.server.base_url (a "
                              "server you run) and eval.server.command (one atlas starts), got "
                              + ("both" if base_url else "neither"))
        self.command, self.startup_timeout = command, startup_timeout
        self.port = port or (free_port() if command else None)
        self.values = {"model": shlex.quote(str(model)), "port": self.port,
                       "adapter": shlex.quote(str(adapter)) if adapter else "",
                       "python": shlex.quote(sys.executable)}
        self.base_url = (base_url or f"http://127.0.0.1:{self.port}/v1").rstrip("/")
        self.log_file = Path(log_file) if log_file else None
        self.proc: subprocess.Popen | None = None
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def _get(self, url: str, timeout: float):
        return urllib.request.urlopen(urllib.request.Request(url, headers=self.headers),
                                      timeout=timeout)

    def argv(self) -> list[str]:
        """The command with its placeholders filled in."""
        try:
            return shlex.split(self.command.format(**self.values))
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(f"eval.server.command={self.command!r}: {type(e).__name__} {e}; "
                              f"placeholders are {{{'}, {'.join(PLACEHOLDERS)}}}") from None

    def __enter__(self) -> "InferenceServer":
        if self.command:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        argv = self.argv()
        out = self.log_file.open("ab") if self.log_file else subprocess.DEVNULL
        log.info("starting the inference server: %s", shlex.join(argv))
        try:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            raise ServerError(f"eval.server.command could not start: {e}") from None
        finally:
            if self.log_file:
                out.close()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self) -> None:
        """Poll ``GET {base_url}/models`` until it answers 200, the process exits, or time is up."""
        deadline, url = time.monotonic() + self.startup_timeout, f"{self.base_url}/models"
        where = f" (its output: {self.log_file})" if self.log_file else ""
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServerError(f"eval.server.command exited with status {self.proc.returncode} "
                                  f"before it answered{where}")
            try:
                with self._get(url, timeout=5) as r:
                    if r.status == 200 and self._healthy():
                        log.info("inference server ready at %s", self.base_url)
                        return
            except urllib.error.HTTPError as e:
                e.close()
                if e.code in (401, 403):
                    raise ServerError(f"{url} answered {e.code}: the server wants a key (name "
                                      f"the variable that holds it: eval.server.api_key_env)") from None
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.monotonic() > deadline:
                raise ServerError(f"the inference server did not answer {url} within "
                                  f"eval.server.startup_timeout={self.startup_timeout:g} s{where}")
            time.sleep(0.25)

    def _healthy(self) -> bool:
        """``GET /health`` at the server's root: vLLM, SGLang, TGI and llama.cpp answer 200 only
        once the model is loaded (llama.cpp lists its models before); a server without the
        route (404) is taken as ready."""
        root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url
        try:
            with self._get(f"{root}/health", timeout=5) as r:
                return r.status == 200
        except urllib.error.HTTPError as e:
            e.close()
            return e.code == 404

    def stop(self) -> None:
        """Stop the started server's whole process group (engine workers included, even once
        the leader has exited): SIGTERM, then SIGKILL for what is left after 30 s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return

        def group_alive() -> bool:
            try:
                os.killpg(proc.pid, 0)
                return True
            except ProcessLookupError:
                return False

        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 30
        while (proc.poll() is None or group_alive()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if group_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        log.info("inference server (pid %d) stopped", proc.pid)

    def served_model(self, name: str | None) -> str:
        """``name``, or the first model the server lists."""
        if name:
            return name
        if self.values["adapter"]:  # servers list the base model first: it would be scored
            raise ConfigError("eval.server.model must name the served LoRA adapter (e.g. "
                              "atlas for --lora-modules atlas={adapter})")
        try:
            with self._get(f"{self.base_url}/models", timeout=30) as r:
                return json.load(r)["data"][0]["id"]
        except (OSError, ValueError, KeyError, IndexError) as e:
            raise ServerError(f"could not list the models of {self.base_url} (set "
                              f"eval.server.model): {e}") from None


class ServerPolicy:
    """:class:`atlas.rollout.Policy`'s interface over an OpenAI-compatible completions API.

    Args:
        tokenizer: The run's tokenizer (its chat template renders the prompts).
        base_url: The server's API root.
        model: The model name requests carry (a LoRA adapter's served name, for one).
        max_new_tokens, temperature, top_p: As for ``Policy``.
        complete: Whether a response holds its action; the stream is closed there.
        concurrency: Requests in flight at once.
        api_key: Sent as the bearer token (local servers ignore it).
        timeout: Seconds a request may take.
    """

    def __init__(self, tokenizer, base_url: str, model: str, max_new_tokens: int = 96,
                 temperature: float = 0.0, top_p: float = 1.0,
                 complete: Callable[[str], bool] | None = None, concurrency: int = 64,
                 api_key: str | None = None, timeout: float = 600, **_: Any):
        import openai

        from atlas.rollout import has_complete_action, stop_token_ids

        if concurrency < 1:
            raise ConfigError(f"eval.server.concurrency must be >= 1, got {concurrency}")
        self.tokenizer, self.model, self.base_url = tokenizer, model, base_url
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.complete = complete or has_complete_action
        self.stop = stop_token_ids(tokenizer)
        self.pool = ThreadPoolExecutor(max_workers=concurrency)
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key or "EMPTY",
                                    timeout=timeout, max_retries=2)

    def prompt_ids(self, chat: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
        from atlas.rollout import prompt_ids

        return prompt_ids(self.tokenizer, chat, tools)

    def forget(self, key: str) -> None:
        """The server keeps (prefix-caches) what it wants; nothing is held here."""

    def generate(self, prompts: list[list[int]], keys: list[str] | None = None,
                 remember: bool = True) -> list[str]:
        """Responses to tokenized prompts, all requested at once."""
        return list(self.pool.map(self._one, prompts))

    def _one(self, prompt: list[int]) -> str:
        import openai

        sampling = ({"temperature": self.temperature, "top_p": self.top_p}
                    if self.temperature > 0 else {"temperature": 0.0})
        text = ""
        try:
            stream = self.client.completions.create(
                model=self.model, prompt=prompt, max_tokens=self.max_new_tokens, stream=True,
                extra_body={"stop_token_ids": self.stop, "skip_special_tokens": True}, **sampling)
            with stream:
                for chunk in stream:
                    if not chunk.choices:
                        continue
                    text += chunk.choices[0].text or ""  # servers stream a token a chunk
                    if self.complete(text):
                        break  # closing the stream ends the generation
        except openai.OpenAIError as e:
            raise ServerError(f"completion request to {self.base_url} failed: "
                              f"{type(e).__name__}: {e}") from None
        return text.strip()

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()


# --- the reference server -------------------------------------------------------------------

class QuietHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server whose threads die with the process and that takes a client that
    hung up for no error."""

    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)  # a client that hung up is no error


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet keep-alive handler of JSON requests and answers (the reference server here, the
    tests' loopback environment servers)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def read_json(self) -> Any:
        return json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")

    def send_json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class ReferenceServer:
    """A minimal OpenAI-compatible completions server for a transformers model.

    ``POST /v1/completions`` (``prompt``: token ids or text; ``max_tokens``, ``temperature``,
    ``top_p``, ``seed``, ``stop``, ``stop_token_ids``, ``stream``), ``GET /v1/models`` and
    ``GET /health``. One request generates at a time; a client that closes a stream stops its
    generation.
    """

    def __init__(self, model, tokenizer, name: str = "atlas", host: str = "127.0.0.1",
                 port: int = 0):
        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.lock = threading.Lock()
        self.requests = 0
        server = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                if self.path.rstrip("/") in ("/v1/models", "/models"):
                    self.send_json(200, {"object": "list", "data": [
                        {"id": server.name, "object": "model", "created": 0, "owned_by": "atlas"}]})
                elif self.path == "/health":
                    self.send_json(200, {"status": "ok"})
                else:
                    self.send_json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                body = self.read_json()
                if self.path.rstrip("/") not in ("/v1/completions", "/completions"):
                    return self.send_json(404, {"error": {"message": f"no route {self.path}"}})
                server.requests += 1
                try:
                    server.complete(self, body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client closed its stream: generation stops

        self.httpd = QuietHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "ReferenceServer":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def tokens(self, body: dict):
        """Generate the response token by token: yields (text so far, finish reason or None)."""
        import torch
        from transformers import DynamicCache

        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (list, str)):
            prompt = prompt[0]
        ids = (list(prompt) if isinstance(prompt, list)
               else self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        stops = set(body.get("stop_token_ids") or []) | (
            {self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        stop_strings = body.get("stop") or []
        stop_strings = [stop_strings] if isinstance(stop_strings, str) else stop_strings
        temperature, top_p = float(body.get("temperature") or 0.0), float(body.get("top_p") or 1.0)
        generator = torch.Generator().manual_seed(int(body.get("seed") or 0))
        device = next(self.model.parameters()).device
        cache, out = DynamicCache(), []
        step = torch.tensor([ids], device=device)
        for _ in range(int(body.get("max_tokens") or 16)):
            logits = self.model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, -1)
                ranked, order = probs.sort(descending=True)
                ranked[ranked.cumsum(-1) - ranked > top_p] = 0
                token = int(order[torch.multinomial(ranked.cpu(), 1, generator=generator)])
            else:
                token = int(logits.argmax())
            if token in stops:
                yield None, "stop"
                return
            out.append(token)
            text = self.tokenizer.decode(out, skip_special_tokens=True)
            hit = next((s for s in stop_strings if s in text), None)
            if hit:
                yield text[:text.index(hit)], "stop"
                return
            yield text, None
            step = torch.tensor([[token]], device=device)
        yield None, "length"

    def complete(self, h: BaseHTTPRequestHandler, body: dict) -> None:
        import torch

        created, stream = int(time.time()), bool(body.get("stream"))

        def chunk(text: str, finish: str | None) -> dict:
            return {"id": f"cmpl-{self.requests}", "object": "text_completion", "created": created,
                    "model": self.name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                     "finish_reason": finish}]}

        with self.lock, torch.inference_mode():
            if not stream:
                text, finish = "", "length"
                for t, finish in self.tokens(body):
                    text = t if t is not None else text
                    if finish:
                        break
                return h.send_json(200, chunk(text, finish))
            h.send_response(200)
            h.send_header("Content-Type", "text/event-stream")
            h.send_header("Transfer-Encoding", "chunked")
            h.end_headers()
            sent = ""

            def write(data: str) -> None:
                raw = data.encode()
                h.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
                h.wfile.flush()

            for text, finish in self.tokens(body):
                delta = ""
                if text is not None and not text.endswith("\ufffd"):  # a partial UTF-8 character
                    delta, sent = text[len(sent):], text
                if delta or finish:
                    write(f"data: {json.dumps(chunk(delta, finish))}\n\n")
                if finish:
                    break
            write("data: [DONE]\n\n")
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a transformers model through the "
                                     "OpenAI completions API (atlas's reference server).")
    parser.add_argument("--model", required=True, help="model directory, hub id or embedded:<key>")
    parser.add_argument("--tokenizer", help="default: --model's")
    parser.add_argument("--name", default=None, help="the served model name (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args(argv)
    from atlas.model import load_model, load_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = load_model(name=args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    with ReferenceServer(model, tokenizer, args.name or args.model, args.host, args.port) as s:
        log.info("serving %s at %s (pid %d)", args.model, s.url, os.getpid())
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
