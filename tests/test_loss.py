"""The masked objective: equals a hand-computed NLL, ignores the tail, refuses empty batches."""

import math

import pytest
import torch

from atlas.data import IGNORE_INDEX, encode, read_trajectories
from atlas.data.datamodule import collate
from atlas.model import load_model
from atlas.module import masked_nll
from conftest import CONF


@pytest.fixture(scope="module")
def tiny_model():
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(CONF / "model" / "tiny_llama.yaml")
    torch.manual_seed(0)
    model = load_model(**OmegaConf.to_container(cfg))
    model.eval()
    return model


@pytest.fixture(scope="module")
def trajectory():
    [t] = [t for t in read_trajectories("pkg://atlas/data/fireact/fireact_hotpotqa.jsonl")
           if t.num_steps >= 4][:1]
    return t


def _hand_nll(logits, labels, step_ids, average):
    """Mean NLL by explicit loops over positions."""
    per_step: dict[tuple[int, int], list[float]] = {}
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] != IGNORE_INDEX:
                logp = logits[b, t - 1].double().log_softmax(-1)[labels[b, t]].item()
                per_step.setdefault((b, int(step_ids[b, t])), []).append(-logp)
    if average == "token":
        values = [v for vs in per_step.values() for v in vs]
        return sum(values) / len(values), len(values), len(per_step)
    means = [sum(vs) / len(vs) for vs in per_step.values()]
    return sum(means) / len(means), sum(map(len, per_step.values())), len(per_step)


@pytest.mark.parametrize("average", ["token", "step"])
def test_loss_equals_hand_computed_mean_nll_over_selected_steps(tiny_model, trajectory, tokenizer, average):
    examples = [encode(trajectory.with_selection([0, 2]), tokenizer),
                encode(trajectory.with_selection([1]), tokenizer)]
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss, n_tok, n_steps = masked_nll(logits, batch["labels"], batch["step_ids"], average)
    expected, exp_tok, exp_steps = _hand_nll(logits, batch["labels"], batch["step_ids"], average)
    assert n_steps == exp_steps == 3
    assert n_tok == exp_tok == sum(e.num_supervised_tokens for e in examples)
    assert math.isclose(loss.item(), expected, rel_tol=1e-5)


def test_token_and_step_averages_differ_when_steps_differ_in_length(tiny_model, trajectory, tokenizer):
    batch = collate([encode(trajectory.with_selection([0, 1, 2]), tokenizer)], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = tiny_model(input_ids=batch["input_ids"]).logits
    tok = masked_nll(logits, batch["labels"], batch["step_ids"], "token")[0]
    step = masked_nll(logits, batch["labels"], batch["step_ids"], "step")[0]
    assert abs(tok.item() - step.item()) > 1e-6


def test_tokens_after_the_last_selected_step_do_not_change_the_loss(tiny_model, trajectory, tokenizer):
    """The tail encode() drops cannot matter: the loss over the full sequence, whatever the
    tail holds, equals the loss over the truncated one."""
    sel = trajectory.with_selection([1])
    ex = encode(sel, tokenizer)
    from atlas.data import tokenize_steps

    full = tokenize_steps(sel, tokenizer).input_ids
    assert len(full) > len(ex.input_ids) + 10  # there is a real tail to drop
    n = len(ex.input_ids)
    pad = lambda xs, v: xs + [v] * (len(full) - n)  # noqa: E731

    def loss(ids, labels, step_ids):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([ids])).logits
        return masked_nll(logits, torch.tensor([labels]), torch.tensor([step_ids]))[0].item()

    truncated = loss(ex.input_ids, ex.labels, ex.step_ids)
    with_tail = loss(full, pad(ex.labels, IGNORE_INDEX), pad(ex.step_ids, -1))
    g = torch.Generator().manual_seed(0)
    other_tail = full[:n] + torch.randint(0, 49152, (len(full) - n,), generator=g).tolist()
    with_other_tail = loss(other_tail, pad(ex.labels, IGNORE_INDEX), pad(ex.step_ids, -1))
    assert truncated == pytest.approx(with_tail, abs=1e-5)
    assert truncated == pytest.approx(with_other_tail, abs=1e-5)
    # ...while changing a token *inside* the supervised region does change it
    changed = list(ex.input_ids)
    first = next(i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX)
    changed[first - 1] = (changed[first - 1] + 1) % 49152
    assert abs(loss(changed, ex.labels, ex.step_ids) - truncated) > 1e-6


def test_batch_without_supervised_token_is_an_error():
    logits = torch.zeros(1, 4, 10)
    with pytest.raises(ValueError, match="no supervised token"):
        masked_nll(logits, torch.full((1, 4), IGNORE_INDEX), torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="loss average"):
        masked_nll(logits, torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long), "mean")
