"""atlas.testing.fake_provider driven by the REAL pinned SDKs (openai==3.51.0, anthropic==2.10.0).

No network and no key: a dummy key is sent to a loopback server. The whole file runs in a few
seconds (the slowest tests sleep 0.2-0.3 s on purpose)."""

from __future__ import annotations

import asyncio
import io
import json
import time
import urllib.error
import urllib.request

import anthropic
import openai
import pydantic
import pytest

from atlas.testing.fake_provider import CRITERIA, FakeProvider, default_answer

KEY = "sk-test-dummy-0000"
PROMPT = "You are the oracle. The trajectory has 12 steps. Select at most 4 critical steps."


class Step(pydantic.BaseModel):
    step: int
    criterion: str
    reason: str


class Answer(pydantic.BaseModel):
    plan: str
    subgoals: list[str]
    critical_steps: list[Step]


TOOL = {"name": "report_critical_steps", "description": "Report the critical steps.",
        "input_schema": Answer.model_json_schema()}


@pytest.fixture
def fake():
    with FakeProvider() as f:
        yield f


def oai(fake, **kw) -> openai.OpenAI:
    return openai.OpenAI(api_key=KEY, base_url=fake.url + "/v1", **kw)


def ant(fake, **kw) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=KEY, base_url=fake.url, **kw)


def chat(prompt=PROMPT):
    return [{"role": "system", "content": prompt}, {"role": "user", "content": "Go."}]


def assert_default(ans: dict, n=12, m=4):
    steps = [s["step"] for s in ans["critical_steps"]]
    assert len(steps) == min(n, m) and len(set(steps)) == len(steps)
    assert all(0 <= s < n for s in steps) and steps[0] == 0
    assert ans["critical_steps"][0]["criterion"] == "Plan Creation"
    assert {s["criterion"] for s in ans["critical_steps"]} <= set(CRITERIA)
    assert ans["plan"] and len(ans["subgoals"]) >= 2


def test_default_answer_edges():
    assert [s["step"] for s in default_answer(10, 3)["critical_steps"]] == [0, 3, 6]
    assert [s["step"] for s in default_answer(3, 8)["critical_steps"]] == [0, 1, 2]
    assert default_answer(5, 0)["critical_steps"] == []
    assert default_answer(0, 4)["critical_steps"] == []


# ------------------------------------------------------------------------------------- OpenAI
def test_openai_parse_with_pydantic_model(fake):
    r = oai(fake).chat.completions.parse(model="gpt-test", messages=chat(), response_format=Answer)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Answer)
    assert_default(parsed.model_dump())
    assert r.model == "gpt-test" and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    req = fake.requests[-1]
    assert req["method"] == "POST" and req["path"] == "/v1/chat/completions"
    assert req["body"]["response_format"]["type"] == "json_schema"  # recorded as received


def test_openai_create_json_object_and_block_content(fake):
    messages = [{"role": "user", "content": [{"type": "text", "text": "The trajectory has 5 steps."},
                                             {"type": "text", "text": "Pick at most 2."}]}]
    fmt = {"type": "json_object", "schema": Answer.model_json_schema()}
    r = oai(fake).chat.completions.create(model="m", messages=messages, response_format=fmt)
    ans = json.loads(r.choices[0].message.content)
    assert [s["step"] for s in ans["critical_steps"]] == [0, 2]
    assert r.choices[0].finish_reason == "stop"
    assert fake.requests[-1]["body"]["response_format"] == fmt


def test_openai_forced_function_tool(fake):
    tools = [{"type": "function", "function": {"name": "report", "parameters": Answer.model_json_schema()}}]
    r = oai(fake).chat.completions.create(model="m", messages=chat(), tools=tools,
                                          tool_choice={"type": "function", "function": {"name": "report"}})
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "report" and r.choices[0].finish_reason == "tool_calls"
    assert_default(json.loads(call.function.arguments))


def test_openai_429_retry_after_is_retried(fake):
    fake.script({"status": 429, "headers": {"retry-after": "0.2"}})
    t = time.monotonic()
    r = oai(fake, max_retries=1).chat.completions.parse(model="m", messages=chat(), response_format=Answer)
    assert time.monotonic() - t >= 0.2  # the SDK slept exactly retry-after
    assert r.choices[0].message.parsed is not None
    assert fake.count("/v1/chat/completions") == 2
    assert fake.requests[-1]["headers"]["x-stainless-retry-count"] == "1"


def test_openai_500_then_success(fake):
    fake.script({"status": 500, "headers": {"retry-after-ms": "10"}})
    r = oai(fake, max_retries=1).chat.completions.create(model="m", messages=chat())
    assert_default(json.loads(r.choices[0].message.content))
    assert fake.count("/v1/chat/completions") == 2 and fake.pending_faults == 0


def test_openai_error_format_and_no_retry_on_400(fake):
    fake.script({"status": 429, "message": "slow down"})
    with pytest.raises(openai.RateLimitError) as exc:
        oai(fake, max_retries=0).chat.completions.create(model="m", messages=chat())
    assert exc.value.status_code == 429 and exc.value.code == "rate_limit_exceeded"
    assert exc.value.body["message"] == "slow down"
    # Missing phrases -> 400, never retried.
    with pytest.raises(openai.BadRequestError, match="The trajectory has N steps"):
        oai(fake, max_retries=3).chat.completions.create(model="m", messages=chat("no numbers here"))
    assert fake.count("/v1/chat/completions") == 2


def test_openai_delay_beyond_timeout_raises_timeout(fake):
    fake.script({"delay": 2.0})
    client = oai(fake, max_retries=0, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):  # the answer would have come, 2 s later
        client.chat.completions.create(model="m", messages=chat())
    # The server is still fine afterwards (the fault was consumed).
    assert client.with_options(timeout=5).chat.completions.create(model="m", messages=chat()).choices


def test_openai_malformed_content_makes_parse_raise(fake):
    # `.parse` validates with `Answer.model_validate_json`: the SDK lets pydantic's
    # ValidationError escape (not an openai.* exception, not retried).
    fake.script({"content": "not json at all"})
    with pytest.raises(pydantic.ValidationError):
        oai(fake).chat.completions.parse(model="m", messages=chat(), response_format=Answer)
    assert fake.count("/v1/chat/completions") == 1


def test_openai_answer_override(fake):
    bad = {"plan": "p", "subgoals": [], "critical_steps": [{"step": 99, "criterion": "Critical Action",
                                                            "reason": "out of range"}]}
    fake.script({"answer": bad})
    r = oai(fake).chat.completions.parse(model="m", messages=chat(), response_format=Answer)
    assert r.choices[0].message.parsed.critical_steps[0].step == 99
    # the queue is empty again: a normal answer follows
    r = oai(fake).chat.completions.parse(model="m", messages=chat(), response_format=Answer)
    assert_default(r.choices[0].message.parsed.model_dump())


def test_custom_answer_callable():
    seen = []

    def answer(n, m, text):
        seen.append((n, m, "oracle" in text))
        return {"plan": "x", "subgoals": ["a", "b"], "critical_steps": []}

    with FakeProvider(answer=answer) as f:
        oai(f).chat.completions.create(model="m", messages=chat())
    assert seen == [(12, 4, True)]


def test_openai_batch_end_to_end(fake):
    fake.batch_overrides = {"c1": {"content": "not json"}, "c2": {"status": 400},
                            "c3": {"answer": {"plan": "o", "subgoals": [], "critical_steps": []}}}
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"model": "gpt-test", "messages": chat(),
                                  "response_format": {"type": "json_object"}}}) for i in range(4)]
    client = oai(fake)
    fo = client.files.create(file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch")
    assert fo.purpose == "batch" and fo.filename == "in.jsonl"
    batch = client.batches.create(input_file_id=fo.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    statuses = [batch.status]
    while batch.status != "completed":
        batch = client.batches.retrieve(batch.id)
        statuses.append(batch.status)
        assert len(statuses) < 10
    assert statuses == ["validating", "in_progress", "completed"]
    assert (batch.request_counts.completed, batch.request_counts.failed) == (3, 1)
    out = {r["custom_id"]: r for r in map(json.loads, client.files.content(batch.output_file_id).text.splitlines())}
    assert set(out) == {"c0", "c1", "c3"}
    body = out["c0"]["response"]["body"]
    assert out["c0"]["response"]["status_code"] == 200 and out["c0"]["error"] is None
    assert_default(json.loads(body["choices"][0]["message"]["content"]))
    assert openai.types.chat.ChatCompletion.model_validate(body).model == "gpt-test"
    assert out["c1"]["response"]["body"]["choices"][0]["message"]["content"] == "not json"
    assert json.loads(out["c3"]["response"]["body"]["choices"][0]["message"]["content"])["plan"] == "o"
    errs = [json.loads(x) for x in client.files.content(batch.error_file_id).text.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errs] == [("c2", 400)]
    # batch lines are not completion requests: no fault consumed, only batch/file paths hit
    assert fake.count("/v1/chat/completions") == 0
    assert fake.count("/v1/batches") == 3 and fake.count("/v1/files") == 3


def test_openai_batch_polls_configurable():
    with FakeProvider(batch_polls=0) as f:
        client = oai(f)
        fo = client.files.create(file=("a.jsonl", b'{"custom_id": "x", "method": "POST", "url": '
                                       b'"/v1/chat/completions", "body": {"model": "m", "messages": '
                                       + json.dumps(chat()).encode() + b"}}\n"), purpose="batch")
        b = client.batches.create(input_file_id=fo.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
        assert client.batches.retrieve(b.id).status == "completed"


# ---------------------------------------------------------------------------------- Anthropic
def test_anthropic_forced_tool_use(fake):
    m = ant(fake).messages.create(model="claude-test", max_tokens=1024, system=PROMPT,
                                  messages=[{"role": "user", "content": [{"type": "text", "text": "Go."}]}],
                                  tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]})
    block = m.content[0]
    assert block.type == "tool_use" and block.name == TOOL["name"] and m.stop_reason == "tool_use"
    assert_default(block.input)
    assert m.usage.input_tokens >= 1 and m.model == "claude-test"


def test_anthropic_parse_output_format(fake):
    m = ant(fake).messages.parse(model="c", max_tokens=1024, output_format=Answer,
                                 messages=[{"role": "user", "content": PROMPT}])
    assert fake.requests[-1]["body"]["output_config"]["format"]["type"] == "json_schema"
    assert m.content[0].type == "text"
    assert_default(m.parsed_output.model_dump())


def test_anthropic_faults(fake):
    fake.script({"status": 429, "headers": {"retry-after": "0.05"}},
                {"status": 529, "headers": {"retry-after-ms": "20"}},
                {"content": "not json at all"})
    m = ant(fake, max_retries=2).messages.create(
        model="c", max_tokens=100, messages=[{"role": "user", "content": PROMPT}],
        tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]})
    # two errors retried, then the malformed answer: a text block instead of tool_use
    assert fake.count("/v1/messages") == 3
    assert m.content[0].type == "text" and m.content[0].text == "not json at all"
    fake.script({"status": 429})
    with pytest.raises(anthropic.RateLimitError) as exc:
        ant(fake, max_retries=0).messages.create(model="c", max_tokens=5,
                                                 messages=[{"role": "user", "content": PROMPT}])
    assert exc.value.body["type"] == "error" and exc.value.body["error"]["type"] == "rate_limit_error"
    fake.script({"status": 529})
    with pytest.raises(anthropic.OverloadedError):
        ant(fake, max_retries=0).messages.create(model="c", max_tokens=5,
                                                 messages=[{"role": "user", "content": PROMPT}])
    fake.script({"delay": 2.0})
    with pytest.raises(anthropic.APITimeoutError):
        ant(fake, max_retries=0, timeout=0.3).messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": PROMPT}])
    with pytest.raises(anthropic.BadRequestError, match="at most M"):
        ant(fake).messages.create(model="c", max_tokens=5, system="The trajectory has 3 steps.",
                                  messages=[{"role": "user", "content": "hi"}])


def test_anthropic_batch_end_to_end(fake):
    fake.batch_overrides["bad"] = {"status": 400}
    params = {"model": "claude-test", "max_tokens": 512, "system": PROMPT,
              "messages": [{"role": "user", "content": "Go."}], "tools": [TOOL],
              "tool_choice": {"type": "tool", "name": TOOL["name"]}}
    client = ant(fake)
    batch = client.messages.batches.create(requests=[{"custom_id": "a", "params": params},
                                                     {"custom_id": "bad", "params": params}])
    assert batch.processing_status == "in_progress" and batch.results_url is None
    with pytest.raises(anthropic.AnthropicError, match="results_url"):
        client.messages.batches.results(batch.id)  # its internal retrieve is the first poll
    batch = client.messages.batches.retrieve(batch.id)
    assert batch.processing_status == "ended" and batch.results_url.startswith(fake.url)
    assert (batch.request_counts.succeeded, batch.request_counts.errored) == (1, 1)
    results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["a"].type == "succeeded"
    assert_default(results["a"].message.content[0].input)
    assert results["bad"].type == "errored"
    assert fake.count("/v1/messages/batches") == 5 and fake.count("/v1/messages/batches/") == 4


# ------------------------------------------------------------------------------ async + infra
def test_async_clients_and_concurrency():
    async def main(f):
        oc = openai.AsyncOpenAI(api_key=KEY, base_url=f.url + "/v1")
        ac = anthropic.AsyncAnthropic(api_key=KEY, base_url=f.url)
        f.script({"status": 500, "headers": {"retry-after": "0.01"}})
        first = await oc.chat.completions.parse(model="m", messages=chat(), response_format=Answer)
        assert first.choices[0].message.parsed is not None
        f.hold_until = 16  # answered only once all 16 are in flight at once
        calls = [oc.chat.completions.create(model="m", messages=chat()) for _ in range(8)]
        calls += [ac.messages.create(model="c", max_tokens=64, messages=[{"role": "user", "content": PROMPT}],
                                     tools=[TOOL], tool_choice={"type": "tool", "name": TOOL["name"]})
                  for _ in range(8)]
        results = await asyncio.gather(*calls)
        await oc.close()
        await ac.close()
        return results

    with FakeProvider(hold_timeout=30) as f:
        results = asyncio.run(main(f))
        assert f.max_in_flight == 16  # the clients sent them concurrently
    assert len(results) == 16
    assert all(json.loads(r.choices[0].message.content) for r in results[:8])
    assert all(r.content[0].type == "tool_use" for r in results[8:])


def test_headers_never_hold_the_key(fake):
    oai(fake).chat.completions.create(model="m", messages=chat())
    ant(fake).messages.create(model="c", max_tokens=5, messages=[{"role": "user", "content": PROMPT}])
    oai(fake).files.create(file=("x.jsonl", b"{}\n"), purpose="batch")
    req = urllib.request.Request(fake.url + "/v1/messages", data=b"{}", method="POST",
                                 headers={"x-api-key": KEY, "content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(req, timeout=5)  # 400: no phrases in the prompt
    assert len(fake.requests) == 4
    for r in fake.requests:
        auth = {k: v for k, v in r["headers"].items() if k in ("authorization", "x-api-key")}
        assert auth and set(auth.values()) == {"***"}
    assert KEY not in repr(fake.requests)


def test_missing_key_401_and_unknown_path_404(fake):
    req = urllib.request.Request(fake.url + "/v1/chat/completions", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 401 and "error" in json.loads(exc.value.read())
    req = urllib.request.Request(fake.url + "/v1/messages", data=b"{}", method="POST")
    with pytest.raises(urllib.error.HTTPError) as exc:
        urllib.request.urlopen(req, timeout=5)
    assert exc.value.code == 401 and json.loads(exc.value.read())["error"]["type"] == "authentication_error"
    with pytest.raises(openai.NotFoundError):
        oai(fake).models.retrieve("gpt-test")
    with pytest.raises(anthropic.NotFoundError):
        ant(fake).messages.batches.retrieve("msgbatch_nope")
    assert fake.pending_faults == 0


def test_stop_frees_the_port():
    f = FakeProvider().start()
    url = f.url
    oai(f).chat.completions.create(model="m", messages=chat())  # leaves a keep-alive connection
    f.stop()
    f.stop()  # idempotent
    with pytest.raises(openai.APIConnectionError):
        openai.OpenAI(api_key=KEY, base_url=url + "/v1", max_retries=0, timeout=2).chat.completions.create(
            model="m", messages=chat())
