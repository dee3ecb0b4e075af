"""Function-calling trajectories: readers and writers, masks on tool-aware templates, selection."""

import json
import logging
import random

import pytest
from omegaconf import open_dict
from transformers import AutoTokenizer

from atlas.data import DataFormatError, MaskingError, Message, Trajectory, encode, read_trajectories
from atlas.data.formats import trajectory_to_record, write_trajectories
from atlas.data.trajectory import ToolCall
from tests.helpers import (FIXTURES, TOKENIZER, TOOL_FAMILIES, compose_train, generated,
                           supervised_runs, tool_tokenizer)

CALLS = FIXTURES / "tool_calls"


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------ readers and writers


def test_openai_round_trip_keeps_calls_results_tools_and_unknown_fields(caplog):
    with caplog.at_level(logging.WARNING):
        trajs = read_trajectories(CALLS / "openai.jsonl")
    warned = [r.getMessage() for r in caplog.records if "does not use" in r.getMessage()]
    assert len(warned) == 1  # once for the file, with counts
    assert "messages[].refusal (1x)" in warned[0] and "record.metadata (1x)" in warned[0]

    first, second, plain = trajs
    step0 = first.steps[0].message
    assert step0.content == "" and [c.name for c in step0.tool_calls] == ["get_order"]
    assert step0.tool_calls[0].args == {"order_id": "#W2041"} and step0.tool_calls[0].id == "call_a1"
    assert first.messages[2].role == "tool" and first.messages[2].tool_call_id == "call_a1"
    assert first.steps[1].message.selected is False  # weight 0
    assert [t["function"]["name"] for t in first.tools] == ["get_order"]
    parallel = second.steps[1].message
    assert parallel.content.startswith("Both orders") and len(parallel.tool_calls) == 2
    assert second.messages[-1].tool_calls and second.messages[-1].role == "assistant"  # no result
    assert not plain.has_tool_calls

    for original, t in zip(_lines(CALLS / "openai.jsonl"), trajs):
        for m in original["messages"]:
            if m["role"] == "assistant":
                m.setdefault("weight", 1)  # the writer states every step's weight
        assert trajectory_to_record(t, "openai") == original
        # through atlas's own format and back: nothing lost
        again = read_trajectories_from_record(trajectory_to_record(t, "atlas"))
        assert trajectory_to_record(again, "openai") == original


def read_trajectories_from_record(record, tmp=None):
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "one.jsonl"
        p.write_text(json.dumps(record) + "\n")
        [t] = read_trajectories(p)
        t.meta.pop("source", None)
        return t


def test_sharegpt_function_call_layout_round_trips(caplog):
    trajs = read_trajectories(CALLS / "sharegpt.json")
    single, parallel = trajs
    assert single.system == "You are a finance assistant."
    assert [m.role for m in single.messages] == ["user", "assistant", "tool", "assistant"]
    assert single.steps[0].message.tool_calls[0].args == {"amount": 250, "from": "EUR", "to": "JPY"}
    assert [c.args["quote"] for c in parallel.steps[0].message.tool_calls] == ["GBP", "CHF"]
    assert [t["name"] for t in single.tools] == ["convert_currency", "get_rate"]
    for original, t in zip(json.loads((CALLS / "sharegpt.json").read_text()), trajs):
        back = trajectory_to_record(t, "sharegpt")
        assert back.pop("id") == t.id
        assert back == original  # tools stay JSON text, unknown fields stay where they were


def test_sharegpt_splits_text_and_call_into_two_turns_and_says_so(tmp_path, caplog):
    t = read_trajectories(CALLS / "openai.jsonl")[1]  # steps with text and calls
    with caplog.at_level(logging.WARNING):
        write_trajectories(tmp_path / "s.jsonl", [t], "sharegpt")
    assert any("2 steps are written as a gpt turn followed by a function_call turn" in r.getMessage()
               for r in caplog.records)
    rec = _lines(tmp_path / "s.jsonl")[0]
    assert [c["from"] for c in rec["conversations"]] == [
        "human", "gpt", "function_call", "observation", "gpt", "function_call", "observation",
        "observation", "function_call"]
    assert json.loads(rec["conversations"][5]["value"])[1]["arguments"]["order_id"] == "#W2"


def test_agentgym_writes_calls_into_the_text(tmp_path, caplog):
    t = read_trajectories(CALLS / "openai.jsonl")[0]
    with caplog.at_level(logging.WARNING):
        write_trajectories(tmp_path / "g.jsonl", [t], "agentgym")
    assert any("agentgym has no tool calls" in r.getMessage() for r in caplog.records)
    [back] = read_trajectories(tmp_path / "g.jsonl")
    assert back.steps[0].message.content == (
        '<tool_call>{"name": "get_order", "arguments": {"order_id": "#W2041"}}</tool_call>')
    assert back.messages[2].content.startswith("<tool_response>{\"order_id\"")
    assert "<tools>" in back.system and '"get_order"' in back.system


def test_agent_data_protocol_mapping():
    weather, code = read_trajectories(CALLS / "adp.jsonl")
    assert weather.id == "weather_0" and weather.meta["details"] == {"source": "handwritten"}
    assert [m.role for m in weather.messages] == ["user", "assistant", "tool", "assistant", "tool",
                                                  "assistant"]
    step0 = weather.steps[0].message  # api_action: description -> thought, kwargs -> arguments
    assert step0.content == "I need both temperatures; Lisbon first."
    assert (step0.tool_calls[0].name, step0.tool_calls[0].args, step0.tool_calls[0].id) == (
        "get_weather", {"city": "Lisbon"}, "call_1")
    assert weather.messages[2].tool_call_id == "call_1" and weather.messages[2].name == "get_weather"
    assert weather.steps[1].message.content == "Now Oslo."  # reasoning_content -> thought
    assert not weather.steps[2].message.tool_calls  # message_action -> text
    assert [t["function"]["name"] for t in weather.tools] == ["get_weather"]

    first, parallel, answer = (s.message for s in code.steps)
    assert first.tool_calls[0].name == "execute_code"  # code_action -> a code-execution call
    assert first.tool_calls[0].args == {"language": "bash", "code": "wc -l data.csv"}
    assert [c.args["q"] for c in parallel.tool_calls] == ['"csv header"', '"wc -l trailing newline"']
    assert [m.content for m in code.messages if m.role == "tool"][1:] == [
        '{"answer": "the header is one line"}', '{"answer": "wc counts newlines"}']
    assert answer.content.startswith("The header is included in wc's count.\n\ndata.csv has")
    assert {t["function"]["name"] for t in code.tools} == {"lookup", "execute_code"}


@pytest.mark.parametrize("record, where, message", [
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                   {"role": "tool", "tool_call_id": "b", "content": "r"}]},
     "bad.jsonl:2: field 'messages[2].tool_call_id'", "'b' matches no earlier tool call"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}]},
     "bad.jsonl:2: field 'messages[1].tool_calls[0].function'", "are not JSON"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "bad.jsonl:2: field 'messages[1].content'", "expected str, got NoneType"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "f(x)"}]},
     "bad.jsonl:2: field 'conversations[1].value'", "a function_call must be the JSON text"),
    ({"id": "x", "content": [{"class_": "text_observation", "content": "q", "source": "user"},
                             {"class_": "browse_action", "content": "x"}]},
     "bad.jsonl:2: field 'content[1].class_'", "got 'browse_action'"),
])
def test_bad_tool_input_names_file_line_and_field(tmp_path, record, where, message):
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}
    if "conversations" in record:
        good = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "ok"}]}
    if "content" in record:
        good = {"id": "g", "content": [{"class_": "text_observation", "content": "hi", "source": "user"},
                                       {"class_": "message_action", "content": "ok"}]}
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_trajectories(p)
    assert str(e.value).startswith(f"{tmp_path}/{where}") and message in str(e.value), str(e.value)


# ---------------------------------------------------------------------------------------- masks

def reference(family, m: Message) -> str:
    """How each family's published template writes a step, written out by hand from its format
    (Qwen2.5: text, then one <tool_call> JSON block per call; Llama-3.1: one
    {"name", "parameters"} JSON object, the text not rendered), plus the end of turn."""
    args = lambda c: json.dumps(c.args, ensure_ascii=False)  # noqa: E731  (jinja's tojson)
    if family == "qwen2_5":
        calls = "".join(f'\n<tool_call>\n{{"name": "{c.name}", "arguments": {args(c)}}}\n</tool_call>'
                        for c in m.tool_calls)
        return ((m.content + calls) if m.content else calls[1:]) + "<|im_end|>"
    if m.tool_calls:
        [c] = m.tool_calls
        return f'{{"name": "{c.name}", "parameters": {args(c)}}}<|eot_id|>'
    return m.content.strip() + "<|eot_id|>"


def tool_cases(family):
    parallel = TOOL_FAMILIES[family][4]
    files = [t for f in ("openai.jsonl", "sharegpt.json", "adp.jsonl") for t in read_trajectories(CALLS / f)]
    return [t for t in files if parallel or all(len(m.tool_calls) <= 1 for m in t.messages)] + \
        generated(40, parallel)


# steps checked per family (deterministic: fixtures plus seeded trajectories); the note quotes them
CHECKED = {"qwen2_5": (47, 79, 75), "llama3_1": (44, 73, 48)}


@pytest.mark.parametrize("family", sorted(TOOL_FAMILIES))
def test_tool_call_masks_are_token_exact_against_the_template_format(family, caplog):
    from atlas.data import masking

    masking._warned_dropped_text.clear()  # warned once per tokenizer and process: here too
    tok = tool_tokenizer(family)
    rng = random.Random(1)
    trajectories = steps = calls = 0
    for t in tool_cases(family):
        chosen = sorted(rng.sample(range(t.num_steps), rng.randint(1, t.num_steps)))
        ex = encode(t.with_selection(chosen), tok)
        expected = [reference(family, t.steps[k].message) for k in chosen]
        assert supervised_runs(ex, tok) == expected, (family, t.id)
        trajectories += 1
        steps += len(chosen)
        calls += sum(len(t.steps[k].message.tool_calls) for k in chosen)
        # tool results are context: in the input, never supervised (Llama-3.1's template writes
        # a result as JSON text: a string is iterable in Jinja, so it goes through tojson)
        text = tok.decode(ex.input_ids, skip_special_tokens=False)
        for m in t.messages[:max(t.steps[k].message_index for k in chosen)]:
            if m.role == "tool":
                assert (json.dumps(m.content, ensure_ascii=False) if family == "llama3_1"
                        else m.content) in text
    assert (trajectories, steps, calls) == CHECKED[family]
    if family == "llama3_1":  # its template drops the text of a step that also calls a tool
        assert any("drops the text of a step that also calls a tool" in r.getMessage()
                   for r in caplog.records)


def test_template_without_tools_is_an_error_with_the_way_out():
    tok = AutoTokenizer.from_pretrained(TOKENIZER)  # SmolLM2's ChatML: no tools
    t = read_trajectories(CALLS / "openai.jsonl")[0]
    with pytest.raises(MaskingError, match="cannot render tool calls .* data.tools_as_text=true"):
        encode(t, tok)
    # the documented text form instead: calls and results are plain turns
    ex = encode(t.as_text(), tok)
    assert supervised_runs(ex, tok) == [
        '<tool_call>{"name": "get_order", "arguments": {"order_id": "#W2041"}}</tool_call><|im_end|>']


def test_llama3_1_refuses_parallel_calls_with_a_clear_error():
    tok = tool_tokenizer("llama3_1")
    t = read_trajectories(CALLS / "openai.jsonl")[1]
    with pytest.raises(MaskingError, match=r"openai.jsonl:2\): the chat template refuses this "
                                           r"conversation: This model only supports single"):
        encode(t, tok)


# ------------------------------------------------------------------------------------ selection


def test_oracle_and_heuristic_see_calls_and_results():
    from atlas.oracle import HeuristicOracle, render_trajectory

    t = read_trajectories(CALLS / "openai.jsonl")[1]
    text = render_trajectory(t, range(t.num_steps))
    assert "[Tools the agent can call]\nget_order, cancel_order, get_user" in text
    assert ('[Step 1]\nBoth orders are yours. Cancelling them now.\n<tool_call>{"name": '
            '"cancel_order", "arguments": {"order_id": "#W1"') in text
    assert '[Tool result: get_user]\n{"user_id": "jane_7"' in text
    assert '[Tool result: cancel_order]\n{"status": "cancelled"}' in text  # named by its call's id
    scores = HeuristicOracle().scores(t)
    assert len(scores) == t.num_steps == 3
    # the call is the step's action; the tool result is the observation it acts on
    assert "cancel order #W1" in scores[1]["Critical Action"][1]
    assert "orders" in scores[1]["Critical Observation"][1]


def tool_tokenizer_dir(tmp_path, family="qwen2_5"):
    d = tmp_path / f"tok_{family}"
    tool_tokenizer(family).save_pretrained(d)
    return d


def test_train_on_openai_tool_calls_and_the_exported_selection_round_trips(tmp_path):
    from atlas.jobs.train import train

    out = tmp_path / "run"
    cfg = compose_train(out, f"data.files=[{CALLS / 'openai.jsonl'}]", "data.format=openai",
                        f"model.tokenizer={tool_tokenizer_dir(tmp_path)}", "data.val_fraction=0",
                        "selector=full", "trainer.max_epochs=1")
    summary = train(cfg)
    stats = summary["selection"]
    assert stats["train/examples"] == 3 and stats["train/supervised_steps"] == 5  # weight 0 left out
    originals = _lines(CALLS / "openai.jsonl")
    exported = _lines(out / "selection.openai.jsonl")
    assert len(exported) == 3
    by_first = {json.dumps(r["messages"][:2]): r for r in exported}
    for original in originals:
        for m in original["messages"]:
            if m["role"] == "assistant":
                m.setdefault("weight", 1)
        back = by_first[json.dumps(original["messages"][:2])]
        assert back == original
    assert {t.id for t in read_trajectories(out / "selection.jsonl")} == {
        t.id for t in read_trajectories(CALLS / "openai.jsonl")}


def test_train_with_tools_as_text_on_a_template_without_tools(tmp_path):
    from atlas.jobs.train import train

    cfg = compose_train(tmp_path, f"data.files=[{CALLS / 'adp.jsonl'}]", "data.val_fraction=0",
                        "selector=random", "ratio=0.5", "data.tools_as_text=true")
    summary = train(cfg)
    assert summary["selection"]["train/examples"] == 2

    with open_dict(cfg):
        cfg.data.tools_as_text = False
        cfg.paths.output_dir = str(tmp_path / "again")
    with pytest.raises(MaskingError, match="data.tools_as_text=true"):
        train(cfg)


@pytest.mark.parametrize("fmt", ["atlas", "openai", "anthropic"])
def test_tool_trajectories_round_trip_through_formats_that_hold_them(tmp_path, fmt):
    trajs = [t for f in ("openai.jsonl", "sharegpt.json", "adp.jsonl", "anthropic.jsonl")
             for t in read_trajectories(CALLS / f)]
    if fmt != "anthropic":  # it has no selection field (all steps read back as selected)
        trajs = [t.with_selection(range(0, t.num_steps, 2)) for t in trajs]
    back = read_trajectories(write_trajectories(tmp_path / f"x.{fmt}.jsonl", trajs, fmt), fmt)
    def keep(t):
        if fmt != "anthropic":
            return t.chat(), t.tools, t.selected_steps
        # a tool_result block names its call by id only, not the function
        return [{k: v for k, v in m.items() if not (m["role"] == "tool" and k == "name")}
                for m in t.chat()], t.tools
    assert [keep(t) for t in back] == [keep(t) for t in trajs]


# ------------------------------------------------------- environments played by function calling


def _env(name):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from tests.helpers import ROOT

    return instantiate(OmegaConf.load(ROOT / "conf" / "env" / f"{name}.yaml"))


def _written(m: Message, style: str) -> str:
    """A step as a model writes it: Qwen2.5's <tool_call> block, Llama-3.1's bare JSON, or
    atlas's text form."""
    [c] = m.tool_calls
    if style == "qwen":
        return f'{m.content}\n<tool_call>\n{json.dumps({"name": c.name, "arguments": c.args})}\n</tool_call>'
    if style == "llama":
        return json.dumps({"name": c.name, "parameters": c.args})
    return m.as_text()


@pytest.mark.parametrize("env_name", ["maze", "babyai", "wordle"])
@pytest.mark.parametrize("style", ["qwen", "llama", "text_form"])
def test_rollouts_by_function_calling_replay_the_expert_in_the_tools_form(env_name, style):
    """A policy that writes the expert's calls reproduces the expert trajectory converted to
    the tools form, call ids and tool results included."""
    from atlas.data.generate import expert_episode
    from atlas.rollout import ActionFormat, EnvPool, run_episodes
    from tests.helpers import ScriptedPolicy

    env = _env(env_name)
    actions = ActionFormat("tools", tools_as_text=style == "text_form")
    tasks = env.tasks("test", 3)
    experts = {t.id: actions.convert(expert_episode(env, t), type(env)) for t in tasks}
    for t in experts.values():  # every step is a call of the environment's tools
        assert all(len(s.message.tool_calls) == 1 for s in t.steps)
        assert {c["function"]["name"] for c in t.tools} >= {s.message.tool_calls[0].name for s in t.steps}
    policy = ScriptedPolicy({k: [_written(s.message, style) for s in v.steps]
                             for k, v in experts.items()})
    episodes = run_episodes(policy, EnvPool({env_name: lambda: _env(env_name)}, instances=3), tasks,
                            actions=actions)
    for ep in episodes:
        assert ep.status == "success" and ep.invalid == 0, ep.record()
        expert = experts[ep.task.id]
        if style == "llama":  # the text of a step is not in its response
            expert = expert.with_selection(range(expert.num_steps))
            for s in expert.steps:
                s.message.content = ""
        assert ep.trajectory.chat() == expert.chat()
        assert ep.trajectory.tools == expert.tools
    # the prompts carry the tools (or, rendered as text, carry them in the system prompt)
    assert (policy.tools is None) == (style == "text_form")
    env.close()


def test_a_malformed_call_is_answered_as_an_observation():
    from atlas.rollout import TOOL_HINT, ActionFormat, EnvPool, run_episodes
    from tests.helpers import ScriptedPolicy

    env = _env("maze")
    [task] = env.tasks("test", 1)
    scripts = {task.id: ['<tool_call>{"name": "move", "arguments": {"direction": </tool_call>',
                         '<tool_call>{"name": "fly", "arguments": {}}</tool_call>',
                         'Action: move[north]']}
    [ep] = run_episodes(ScriptedPolicy(scripts), EnvPool({"maze": lambda: _env("maze")}), [task],
                        max_turns=3, actions=ActionFormat("tools"))
    assert ep.invalid == 3 and ep.status == "max_turns"
    assert [m.content for m in ep.trajectory.messages if m.role == "user"][1:] == [
        f"Observation: {TOOL_HINT}"] * 2


def test_step_evaluation_reads_calls_as_actions():
    from omegaconf import OmegaConf

    from atlas import step_eval
    from atlas.rollout import ActionFormat
    from tests.helpers import ROOT

    envs = {"maze": ("held_out", OmegaConf.load(ROOT / "conf" / "env" / "maze.yaml"))}
    cfg = OmegaConf.create({"tasks": 2, "seed": 0, "mistake_fraction": 0.0, "criteria_ratio": 0.3})
    items, _ = step_eval.load_suite(envs, cfg, ActionFormat("tools"))
    t, group, read, _ = items[0]
    call = t.steps[0].message.tool_calls[0]
    assert call.name == "move" and t.tools[0]["function"]["name"] == "move"
    right = call.args["direction"]
    wrong = next(d for d in ("north", "south", "east", "west") if d != right)
    for response, correct in [
            (f'Go.\n<tool_call>\n{{"name": "move", "arguments": {{"direction": "{right}"}}}}\n</tool_call>', True),
            (f'{{"name": "move", "parameters": {{"direction": "{right}"}}}}', True),
            (f'<tool_call>{{"name": "move", "arguments": {{"direction": "{wrong}"}}}}</tool_call>', False),
            (f"Action: move[{right}]", False)]:  # text actions are not calls
        assert step_eval._judge(t, read, 0, response)["correct"] is correct, response
    # as training with data.tools_as_text renders them: the expert's call is in its text
    items, _ = step_eval.load_suite(envs, cfg, ActionFormat("tools", tools_as_text=True))
    t, _, read, _ = items[0]
    assert t.tools is None and "<tool_call>" in t.steps[0].message.content
    assert step_eval._judge(t, read, 0, t.steps[0].message.content)["correct"]


def test_anthropic_tool_use_blocks(caplog):
    [t] = read_trajectories(CALLS / "anthropic.jsonl")  # detected by its content blocks
    assert [m.role for m in t.messages] == ["user", "assistant", "tool", "assistant", "tool", "tool",
                                            "assistant"]
    first, parallel, answer = (s.message for s in t.steps)
    assert first.content == "Let me check March 3 first."
    assert (first.tool_calls[0].name, first.tool_calls[0].args, first.tool_calls[0].id) == (
        "list_events", {"date": "2027-03-03"}, "toolu_01")
    assert [c.id for c in parallel.tool_calls] == ["toolu_02", "toolu_03"]
    assert [m.content for m in t.messages if m.role == "tool"] == ["[]", "created", '["Dentist"]']
    assert t.tools[0]["input_schema"]["required"] == ["date"]
    back = trajectory_to_record(t, "anthropic")
    original = _lines(CALLS / "anthropic.jsonl")[0]
    # the same record, except a result's text blocks come back as one string
    original["messages"][4]["content"][1]["content"] = '["Dentist"]'
    assert back == original
    ex = encode(t, tool_tokenizer("qwen2_5"))  # and it trains like any other
    assert len(supervised_runs(ex, tool_tokenizer("qwen2_5"))) == 3


@pytest.mark.parametrize("env_name, tid", [("babyai", "babyai/BabyAI-PickupLoc-v0/train/0"),
                                           ("wordle", None)])
def test_counterfactual_costs_are_the_same_in_the_tools_form(env_name, tid):
    from atlas.counterfactual import step_costs
    from atlas.rollout import ActionFormat
    from tests.helpers import ROOT

    env = _env(env_name)
    data = read_trajectories(ROOT / "atlas" / "data" / "default" / f"{env_name}.jsonl")
    t = next(x for x in data if x.id == tid) if tid else next(
        x for x in data if x.meta["mistake_step"] is not None)  # a recorded mistake replays too
    tools = ActionFormat("tools").convert(t, type(env))
    assert tools.steps[0].message.tool_calls and tools.messages[2].role == "tool"
    assert step_costs(env, tools) == step_costs(env, t)
    env.close()


# ------------------------------------------------------------------------------- edge cases


def test_fields_from_another_format_never_override_the_selection(tmp_path):
    """A ShareGPT turn's own 'weight' field is not OpenAI's weight: written as OpenAI, the
    selection decides, and the foreign field stays out."""
    p = tmp_path / "s.json"
    p.write_text(json.dumps([{"conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a", "weight": 0},
        {"from": "human", "value": "r"}, {"from": "gpt", "value": "b", "weight": 1}]}]))
    [t] = read_trajectories(p)
    rec = trajectory_to_record(t.with_selection([0]), "openai")
    assert [m.get("weight") for m in rec["messages"] if m["role"] == "assistant"] == [1, 0]
    back = trajectory_to_record(t, "sharegpt")  # its own format gets them back
    assert [c.get("weight") for c in back["conversations"]] == [None, 0, None, 1]


def test_openai_content_parts_are_not_read_as_anthropic(tmp_path):
    p = tmp_path / "parts.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]},
                                          {"role": "assistant", "content": "a", "weight": 0}]}) + "\n")
    with pytest.raises(DataFormatError, match=r"parts.jsonl:1: field 'messages\[0\].content': "
                                              r"expected str, got list"):
        read_trajectories(p)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                   {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [5]}]}]},
     "field 'messages[2].content[0].content[0]': expected an object"),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}]},
                   {"role": "tool", "tool_call_id": 7, "content": "r"}]},
     "field 'messages[2].tool_call_id': expected str, got int"),
    ({"id": "x", "content": [
        {"class_": "text_observation", "content": "q", "source": "user"},
        {"class_": "api_action", "function": "f", "kwargs": {}, "tool_call_id": "c1"},
        {"class_": "text_observation", "content": "r", "source": "environment", "tool_call_id": "c9"}]},
     "field 'content[2].tool_call_id': 'c9' answers no pending call"),
])
def test_more_bad_tool_input(tmp_path, record, message):
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataFormatError) as e:
        read_trajectories(p)
    assert message in str(e.value), str(e.value)


def test_empty_arguments_text_is_a_call_without_parameters(tmp_path):
    p = tmp_path / "noargs.jsonl"
    p.write_text(json.dumps({"messages": [
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "now", "arguments": ""}}]}]}) + "\n")
    [t] = read_trajectories(p)
    assert t.steps[0].message.tool_calls[0].args == {}
    assert trajectory_to_record(t, "openai")["messages"][1]["tool_calls"][0]["function"]["arguments"] == ""


def test_as_text_merges_only_results_of_one_step():
    t = Trajectory("x", "e", [
        Message("user", "q"),
        Message("assistant", "", tool_calls=[ToolCall("f", {}, id="a"), ToolCall("g", {}, id="b")]),
        Message("user", "also hurry"),
        Message("tool", "A", tool_call_id="a"), Message("tool", "B", tool_call_id="b")])
    assert [(m.role, m.content) for m in t.as_text().messages[2:]] == [
        ("user", "also hurry"), ("user", "<tool_response>A</tool_response>\n<tool_response>B</tool_response>")]


@pytest.mark.parametrize("text, call", [
    ('I could say {"name": "wrong"} here.\n<tool_call>\n{"name": "move", "arguments": {"d": 1}}\n</tool_call>',
     ("move", {"d": 1})),
    ('<tool_call>{"name": "set", "arguments": {"name": "bob", "age": 3}', None),  # still being written
    ('{"name": "set", "arguments": {"name": "bob", "age": 3}', None),
    ('{"name": "set", "parameters": {"name": "bob"}}', ("set", {"name": "bob"})),  # Llama-3.1
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 2}"}</tool_call>', ("f", {"x": 2})),
    ('no call at all {braces}', None),
])
def test_parse_call(text, call):
    from atlas.rollout import parse_call

    got = parse_call(text)
    assert (got and got[:2]) == call


def test_heuristic_reads_the_next_user_turn_after_a_plain_step():
    """Plain trajectories are scored as before tool calls existed: a step's outcome is the next
    user turn, even past another assistant turn."""
    from atlas.oracle import HeuristicOracle

    t = Trajectory("x", "e", [Message("user", "task"), Message("assistant", "Thought: a\nAction: open box"),
                              Message("assistant", "Thought: b\nAction: take key"),
                              Message("user", "Observation: The box opens."),
                              Message("user", "Observation: Nothing happens."),
                              Message("assistant", "Thought: c\nAction: go west")],
                   meta={"final_observation": "You win"})
    scores = HeuristicOracle().scores(t)
    assert "The box opens." in scores[0]["Critical Action"][1]
    assert "The box opens." in scores[1]["Critical Action"][1]


@pytest.mark.parametrize("text, done", [
    ('{"name": "move", "arguments": {"direction": "north"}}', True),  # Llama-3.1: no newline after
    ('<tool_call>{"name": "move", "arguments": {"direction": "north"}}', True),
    ('<tool_call>{"name": "move", "arguments": {"direction": "nor', False),
])
def test_shared_prefix_decoder_stops_a_row_once_its_call_is_written(tokenizer, text, done):
    """The decoder's rows stop where the rollout policy's do: right after a complete call,
    whether or not a newline follows."""
    from omegaconf import OmegaConf

    from atlas.model import load_model
    from atlas.rollout import ActionFormat
    from atlas.prefix_decoding import SharedPrefixDecoder, _Row
    from tests.helpers import CONF

    model = load_model(config=OmegaConf.load(CONF / "model" / "tiny_llama.yaml").config)
    decoder = SharedPrefixDecoder(model, tokenizer, complete=ActionFormat("tools").complete)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert decoder._finished(_Row((0, 0), 0, 0, [], ids)) is done


@pytest.mark.parametrize("family", sorted(TOOL_FAMILIES))
def test_action_granularity_of_a_tool_step_is_its_calls(family):
    """selector.granularity=action supervises the calls as the template writes them (and the
    end of turn), =thought the step's text before them (none where the template drops it)."""
    from atlas.envs.base import action_start

    tok = tool_tokenizer(family)
    eot = "<|im_end|>" if family == "qwen2_5" else "<|eot_id|>"
    rng = random.Random(2)
    checked = 0
    for t in tool_cases(family):
        chosen = sorted(rng.sample(range(t.num_steps), rng.randint(1, t.num_steps)))
        expected = {"action": [], "thought": []}
        for k in chosen:
            m = t.steps[k].message
            if m.tool_calls:
                whole = reference(family, m)
                thought = m.content.strip() if family == "qwen2_5" else ""
                cut = whole.index(thought) + len(thought) if thought else 0
                expected["action"].append(whole[cut:].lstrip())
                if thought:
                    expected["thought"].append(whole[:len(whole) - len(whole[cut:].lstrip())])
                checked += 1
            else:
                text = m.content if family == "qwen2_5" else m.content.strip()
                a = action_start(text)
                expected["action"].append((text if a is None else text[a:]) + eot)
                if a != 0:
                    expected["thought"].append(text if a is None else text[:a])
        for granularity, runs in expected.items():
            if not runs:
                continue
            ex = encode(t.with_selection(chosen), tok, granularity=granularity)
            assert supervised_runs(ex, tok) == runs, (family, t.id, granularity)
    assert checked > 40
