"""Per-step loss masks, token-exact on real chat-template families."""

import dataclasses
import json
import random

import pytest
from transformers import AutoTokenizer

from atlas.data import IGNORE_INDEX, MaskingError, Message, Trajectory, encode, read_trajectories
from atlas.data.masking import StepOverflowError, tokenize_steps
from tests.helpers import TOKENIZER, supervised_runs, template_tokenizer

# family -> (template file or None for the tokenizer's own, special tokens to add, bos, eot)
FAMILIES = {
    "chatml_smollm2": (None, [], None, "<|im_end|>"),
    "qwen2_5": ("qwen2_5.jinja", [], None, "<|im_end|>"),
    "llama3": ("llama3.jinja", ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>"),
    "gemma": ("gemma.jinja", ["<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<end_of_turn>"),
    "phi3": ("phi3.jinja", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"], None, "<|end|>"),
    # closes a turn with two tokens: both are supervised
    "cohere2": ("cohere2.jinja", ["<BOS_TOKEN>", "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>",
                                  "<|SYSTEM_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                                  "<|START_RESPONSE|>", "<|END_RESPONSE|>"], "<BOS_TOKEN>",
                "<|END_RESPONSE|><|END_OF_TURN_TOKEN|>"),
}


def family_tokenizer(family):
    """The shipped SmolLM2 tokenizer with a real template of another family and its specials."""
    template, specials, bos, _ = FAMILIES[family]
    return template_tokenizer(template, specials, bos)


def real_trajectories(shared_data):
    trajs = read_trajectories(shared_data / "fireact/multitask.jsonl")[:40]
    trajs += read_trajectories(shared_data / "agentinstruct-sample/agenttuning_alfworld_sample_record0.json")
    trajs.append(Trajectory("sys", "e", system="You are an agent. Answer with Thought and Action.",
                            messages=trajs[0].messages))
    return trajs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_masks_are_token_exact(shared_data, family):
    tok = family_tokenizer(family)
    eot = FAMILIES[family][3]
    rng = random.Random(0)
    checked = 0
    for t in real_trajectories(shared_data):
        chosen = sorted(rng.sample(range(t.num_steps), rng.randint(1, t.num_steps)))
        sel = t.with_selection(chosen)
        ex = encode(sel, tok)
        expected = [t.steps[k].message.content.strip() + eot for k in chosen]
        assert supervised_runs(ex, tok) == expected, (family, t.id)
        assert ex.selected_steps == chosen
        # the tail after the last selected step is gone: the sequence ends on its end-of-turn
        assert tok.decode(ex.input_ids, skip_special_tokens=False).endswith(eot)
        assert ex.labels[-1] == ex.input_ids[-1]
        # and what remains is a prefix of the full rendering
        full = tokenize_steps(sel, tok)
        assert full.input_ids[:len(ex.input_ids)] == ex.input_ids
        checked += 1
    assert checked == 42


# Text that a search for the step's text in the rendered chat matches at the wrong place.
FOOLING = {
    # a few-shot system prompt that holds the first observation and then the step
    "few-shot system prompt": Trajectory(
        "fewshot", "e", system="Example:\nTask: find the key\nAction: go north",
        messages=[Message("user", "Task: find the key"), Message("assistant", "Action: go north"),
                  Message("user", "You see a key."), Message("assistant", "Action: take key")]),
    # one-word steps that also occur in the template's own markup
    "steps that are markup": Trajectory(
        "markup", "e", [Message("user", "q"), Message("assistant", "end"), Message("user", "r"),
                        Message("assistant", "start"), Message("user", "s"),
                        Message("assistant", "a"), Message("user", "t"),
                        Message("assistant", "assistant")]),
    # a step that equals an earlier observation and the generation header's role name
    "step repeats an observation": Trajectory(
        "repeat", "e", [Message("user", "model"), Message("assistant", "model"),
                        Message("user", "user"), Message("assistant", "user")]),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("case", sorted(FOOLING))
def test_text_cannot_fool_the_masks(family, case):
    """Every step is located at its own turn: the supervised tokens decode to the steps and
    their end of turn, and each span starts after the message before it in the rendering."""
    tok, eot = family_tokenizer(family), FAMILIES[family][3]
    t = FOOLING[case]
    ex = encode(t, tok)
    assert supervised_runs(ex, tok) == [s.message.content + eot for s in t.steps], (family, case)
    # an independent reference: each step starts right after the generation prompt of the
    # conversation before it, rendered prefix by prefix
    chat = t.chat()
    if family == "gemma" and t.system is not None:  # refuses a system role: folded, as atlas does
        chat = [{"role": "user", "content": chat[0]["content"] + "\n\n" + chat[1]["content"]}] + chat[2:]
    enc = tokenize_steps(t, tok)
    offsets = tok(enc.text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [len(tok.apply_chat_template(chat[:i], tokenize=False, add_generation_prompt=True))
              for i, m in enumerate(chat) if m["role"] == "assistant"]
    assert [offsets[a][0] for a, _ in enc.step_spans] == starts, (family, case)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_empty_step_is_an_error_naming_it(family):
    t = Trajectory("empty", "e", [Message("user", "x"), Message("assistant", "go"),
                                  Message("user", "y"), Message("assistant", "stop")],
                   meta={"source": "d.jsonl:3"})
    t.messages[3].content = ""  # readers refuse an empty turn; masks refuse one made later
    with pytest.raises(MaskingError, match=r"trajectory empty \(d.jsonl:3\): step 1 .*empty"):
        tokenize_steps(t, family_tokenizer(family))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_control_string_in_a_step(family, caplog):
    tok, eot = family_tokenizer(family), FAMILIES[family][3]
    control = tok.convert_ids_to_tokens(tok(eot, add_special_tokens=False)["input_ids"][-1])
    t = Trajectory("ctl", "e", [Message("user", "q"), Message("assistant", "ok"),
                                Message("user", "r"), Message("assistant", f"stop{control} now")])
    with caplog.at_level("WARNING"):
        tokenize_steps(t, tok)
    assert f"trajectory ctl: step 1 (message 3) contains the control string {control}" in caplog.text
    with pytest.raises(MaskingError, match=r"step 1 \(message 3\) contains the control string"):
        encode(t, tok, special_tokens_in_text="error")
    caplog.clear()
    with caplog.at_level("WARNING"):
        encode(t, tok, special_tokens_in_text="allow")
    assert "control string" not in caplog.text
    with pytest.raises(ValueError, match="special_tokens_in_text must be one of"):
        encode(t, tok, special_tokens_in_text="maybe")


def test_step_is_found_after_an_observation_that_repeats_it(tokenizer):
    """A step equal to earlier user text must be matched at its own turn, not the earlier one."""
    t = Trajectory("r", "e", [Message("user", "Say: go north"), Message("assistant", "go north"),
                              Message("user", "go north"), Message("assistant", "go north")])
    ex = encode(t.with_selection([1]), tokenizer)
    tok = tokenize_steps(t, tokenizer)
    assert tok.step_spans[0][0] < tok.step_spans[1][0]
    assert supervised_runs(ex, tokenizer) == ["go north<|im_end|>"]
    assert ex.labels[tok.step_spans[0][0]:tok.step_spans[0][1]] == [IGNORE_INDEX] * (
        tok.step_spans[0][1] - tok.step_spans[0][0])


def _long_trajectory(n_steps=6):
    msgs = []
    for i in range(n_steps):
        msgs += [Message("user", f"Observation {i}: " + "lorem ipsum " * 20),
                 Message("assistant", f"Thought: step {i}.\nAction: act[{i}]")]
    return Trajectory("long", "e", msgs)


def test_max_length_never_cuts_a_selected_step(tokenizer):
    t = _long_trajectory()
    spans = tokenize_steps(t, tokenizer).step_spans
    max_length = spans[3][1] + 2  # steps 0..3 fit, 4 and 5 do not
    ex = encode(t.with_selection([1, 4, 5]), tokenizer, max_length=max_length)
    assert ex.selected_steps == [1] and ex.dropped_steps == [4, 5]
    assert len(ex.input_ids) == spans[1][1] <= max_length
    with pytest.raises(StepOverflowError, match=r"selected steps \[4, 5\] end past max_length"):
        encode(t.with_selection([1, 4, 5]), tokenizer, max_length=max_length, overflow="error")
    with pytest.raises(StepOverflowError, match="all end past max_length"):
        encode(t.with_selection([5]), tokenizer, max_length=max_length)
    # a step that straddles the limit is dropped whole, never half-supervised
    ex = encode(t.with_selection([3, 4]), tokenizer, max_length=spans[4][1] - 1)
    assert ex.selected_steps == [3] and len(ex.input_ids) == spans[3][1]


def test_no_supervised_token_is_an_error(tokenizer):
    t = _long_trajectory(2).with_selection([])
    with pytest.raises(MaskingError, match="no supervised token"):
        encode(t, tokenizer)


def test_template_that_rewrites_steps_is_an_error(tokenizer):
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | upper }}\n"
                         "{% endfor %}")
    t = Trajectory("u", "e", [Message("user", "q"), Message("assistant", "think")])
    with pytest.raises(MaskingError, match="not appear verbatim"):
        encode(t, tok)


def test_template_refusal_names_the_trajectory_and_its_source(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                             {"role": "user", "content": "q2"},
                                             {"role": "assistant", "content": "a"}]}) + "\n")
    [t] = read_trajectories(path)
    with pytest.raises(MaskingError, match=r"trajectory t-[0-9a-f]{12} \(t.jsonl:1\): the chat template refuses"
                                           r".*roles must alternate"):
        encode(t, family_tokenizer("gemma"))


def test_datamodule_reports_and_leaves_out_what_cannot_be_supervised(tokenizer, caplog):
    from atlas.data.datamodule import TrajectoryDataModule

    long = _long_trajectory()
    spans = tokenize_steps(long, tokenizer).step_spans
    limit = spans[2][1]
    fine = long.with_selection([0, 1])
    partly = dataclasses.replace(long.with_selection([1, 4]), id="partly")
    lost = dataclasses.replace(long.with_selection([5]), id="lost")
    empty = dataclasses.replace(long.with_selection([]), id="empty")
    dm = TrajectoryDataModule([fine, partly, lost, empty], [long], tokenizer, max_length=limit)
    dm.setup()
    assert [e.trajectory_id for e in dm.train_examples] == ["long", "partly"]
    assert dm.stats["train/trajectories_skipped"] == 2
    assert dm.stats["train/steps_dropped_max_length"] == 2  # step 4 of "partly", step 5 of "lost"
    assert dm.stats["train/supervised_steps"] == 3
    assert "1 trajectories have no selected step" in caplog.text
    assert "1 trajectories lost every selected step" in caplog.text
    # validation scores every candidate step that fits
    assert dm.val_examples[0].selected_steps == [0, 1, 2]
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "step_ids"}
    strict = TrajectoryDataModule([partly], [], tokenizer, max_length=limit, overflow="error")
    with pytest.raises(StepOverflowError, match="partly"):
        strict.setup()
    with pytest.raises(MaskingError, match="no example has a supervised token"):
        TrajectoryDataModule([empty], [], tokenizer).setup()


@pytest.mark.parametrize("family", ["chatml_smollm2", "llama3"])
def test_step_with_surrounding_whitespace_keeps_its_end_of_turn(family):
    """ChatML keeps "go north \n" whole, Llama-3 trims it: either way the supervised span is
    the rendered step and its end-of-turn token."""
    tok = family_tokenizer(family)
    t = Trajectory("w", "e", [Message("user", "where?"), Message("assistant", "go north \n")])
    rendered = t.steps[0].message.content if family == "chatml_smollm2" else "go north"
    assert supervised_runs(encode(t, tok), tok) == [rendered + FAMILIES[family][3]]


def test_special_tokens_in_text_is_a_data_setting(tmp_path):
    from hydra.utils import instantiate

    from tests.helpers import compose_train

    for value in ("error", "allow"):
        cfg = compose_train(tmp_path, f"data.special_tokens_in_text={value}")
        loader = instantiate(cfg.data.loader, _partial_=True)(train=[], val=[], tokenizer=None)
        assert loader.special_tokens_in_text == value


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_action_and_thought_granularity_are_token_exact(shared_data, family):
    """selector.granularity=action supervises each chosen step from the Action: that the
    rollout loop reads through its end of turn; =thought what comes before it, no end of turn.
    A step without an action: whole under action, without its end of turn under thought."""
    from atlas.envs.base import action_start

    tok = family_tokenizer(family)
    eot = FAMILIES[family][3]
    rng = random.Random(1)
    parts = {"action": 0, "thought": 0, "whole": 0}
    for t in real_trajectories(shared_data):
        chosen = sorted(rng.sample(range(t.num_steps), rng.randint(1, t.num_steps)))
        sel = t.with_selection(chosen)
        step = encode(sel, tok)
        for granularity in ("action", "thought"):
            expected = []
            for k in chosen:
                text = t.steps[k].message.content.strip()
                a = action_start(text)
                if a is None:
                    parts["whole"] += 1
                    expected.append(text + eot if granularity == "action" else text)
                elif granularity == "action":
                    parts["action"] += 1
                    expected.append(text[a:] + eot)
                elif text[:a]:
                    parts["thought"] += 1
                    expected.append(text[:a])
            if not expected:  # only thoughtless steps chosen: nothing to supervise
                with pytest.raises(MaskingError, match="have no thought"):
                    encode(sel, tok, granularity=granularity)
                continue
            ex = encode(sel, tok, granularity=granularity)
            assert supervised_runs(ex, tok) == expected, (family, t.id, granularity)
            assert ex.num_supervised_tokens <= step.num_supervised_tokens
            assert ex.input_ids == step.input_ids[:len(ex.input_ids)]
    assert parts["action"] > 60 and parts["thought"] > 60, parts  # (whole: the test below)


def test_granularity_is_checked_and_a_thoughtless_selection_is_left_out(tokenizer, caplog):
    from atlas.data.datamodule import TrajectoryDataModule
    from atlas.data.masking import NothingToSuperviseError

    t = Trajectory("t", "e", [Message("user", "go"), Message("assistant", "Action: north"),
                              Message("user", "ok"), Message("assistant", "Thought: x\nAction: y")])
    with pytest.raises(ValueError, match="granularity must be one of"):
        encode(t, tokenizer, granularity="token")
    with pytest.raises(NothingToSuperviseError, match="no thought"):
        encode(t.with_selection([0]), tokenizer, granularity="thought")
    dm = TrajectoryDataModule([t.with_selection([0]), t.with_selection([1])], [], tokenizer,
                              granularity="thought")
    dm.setup("fit")
    assert [e.trajectory_id for e in dm.train_examples] == ["t"]
    assert "1 trajectories have no selected step with a thought" in caplog.text
    # AgentGym's "Action:" on a line of its own, and a call written into the text
    # (data.tools_as_text) are actions too
    g = Trajectory("g", "e", [Message("user", "go"), Message("assistant",
                                                               "Thought:\nI buy.\n\nAction:\nclick[Buy]"),
                              Message("user", "ok"), Message("assistant",
                                                             'I look.\n<tool_call>{"name": "look"}</tool_call>')])
    assert supervised_runs(encode(g, tokenizer, granularity="action"), tokenizer) == [
        "Action:\nclick[Buy]<|im_end|>", '<tool_call>{"name": "look"}</tool_call><|im_end|>']
    assert supervised_runs(encode(g, tokenizer, granularity="thought"), tokenizer) == [
        "Thought:\nI buy.\n\n", "I look.\n"]
    # a step without an action: whole under action, without its end of turn under thought
    u = Trajectory("u", "e", [Message("user", "go"), Message("assistant", "I am not sure yet.")])
    assert supervised_runs(encode(u, tokenizer, granularity="action"), tokenizer) == [
        "I am not sure yet.<|im_end|>"]
    assert supervised_runs(encode(u, tokenizer, granularity="thought"), tokenizer) == [
        "I am not sure yet."]
