"""The masked objective: equals a hand-computed NLL, ignores the tail, refuses empty batches."""

import math

import pytest
import torch

from atlas.data import IGNORE_INDEX, encode, read_trajectories
from atlas.data.datamodule import collate
from atlas.model import load_model
from atlas.module import masked_nll
from tests.helpers import CONF


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


def _batch(trajectory, tokenizer):
    """Two rows of different lengths (right padding) with different selections."""
    examples = [encode(trajectory.with_selection([0, 2]), tokenizer),
                encode(trajectory.with_selection([1]), tokenizer)]
    return collate(examples, tokenizer.pad_token_id)


def _loss_and_grads(model, batch, **module_kw):
    from atlas.module import AtlasLM

    model.zero_grad(set_to_none=True)
    loss, n_tok, n_steps = AtlasLM(model, **module_kw).loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), n_tok, n_steps, grads


@pytest.mark.parametrize("average", ["token", "step"])
@pytest.mark.parametrize("chunk", [1, 7, 100_000])
def test_gathered_loss_equals_the_full_logits_loss(tiny_model, trajectory, tokenizer, average,
                                                   chunk):
    """The LM head on supervised positions only, in checkpointed chunks: same loss, same
    gradients as full logits."""
    batch = _batch(trajectory, tokenizer)
    full = _loss_and_grads(tiny_model, batch, loss_average=average, loss_impl="full")
    gathered = _loss_and_grads(tiny_model, batch, loss_average=average, loss_impl="gathered",
                               loss_chunk_size=chunk)
    assert gathered[0] == pytest.approx(full[0], abs=1e-5) and gathered[1:3] == full[1:3]
    assert full[3].keys() == gathered[3].keys()
    for name, g in full[3].items():
        torch.testing.assert_close(gathered[3][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_gathered_loss_equals_the_models_own_labels_loss(tiny_model, trajectory, tokenizer):
    """What a plain SFT trainer computes (TRL with precomputed labels): the model's loss."""
    batch = _batch(trajectory, tokenizer)
    ours = _loss_and_grads(tiny_model, batch)[0]
    theirs = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss.item()
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_gathered_loss_through_a_lora_adapter(trajectory, tokenizer):
    from omegaconf import OmegaConf
    from peft import LoraConfig

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_llama.yaml"))
    torch.manual_seed(0)
    model = load_model(**cfg, peft=LoraConfig(r=4, target_modules="all-linear"))
    batch = _batch(trajectory, tokenizer)
    full = _loss_and_grads(model, batch, loss_impl="full")
    gathered = _loss_and_grads(model, batch, loss_impl="gathered", loss_chunk_size=5)
    assert gathered[0] == pytest.approx(full[0], abs=1e-5)
    assert full[3] and full[3].keys() == gathered[3].keys()  # only the adapter trains
    assert all("lora_" in n for n in full[3])
    for name, g in full[3].items():
        torch.testing.assert_close(gathered[3][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_models_with_softcapped_logits_use_the_full_path():
    from atlas.module import AtlasLM

    model = load_model(config={"model_type": "gemma2", "vocab_size": 128, "hidden_size": 16,
                               "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 2, "num_key_value_heads": 1,
                               "head_dim": 8, "final_logit_softcapping": 30.0},
                       attn_implementation="eager")
    assert AtlasLM(model).loss_impl == "full"
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        AtlasLM(model, loss_impl="fast")


@pytest.mark.parametrize("average", ["token", "step"])
@pytest.mark.parametrize("loss_impl", ["gathered", "full"])
def test_packed_rows_give_the_loss_of_the_separate_examples(tiny_model, tokenizer, average,
                                                            loss_impl):
    """Several examples in one row: position ids restart per example and nothing attends across
    them, so the loss (and its gradients) equal those of the padded, unpacked batch."""
    from atlas.data.datamodule import collate_packed, pack
    from atlas.module import AtlasLM

    trajs = read_trajectories("pkg://atlas/data/default/babyai.jsonl")[:3] + \
        read_trajectories("pkg://atlas/data/default/wordle.jsonl")[:3]
    examples = [encode(t.with_selection(range(0, t.num_steps, 2)), tokenizer) for t in trajs]
    capacity = 2 * max(len(e.input_ids) for e in examples)
    bins = pack(examples, capacity)
    assert len(bins) < len(examples) and all(
        sum(len(e.input_ids) for e in b) <= capacity for b in bins)
    assert sorted(e.trajectory_id for b in bins for e in b) == sorted(t.id for t in trajs)
    module = AtlasLM(tiny_model, loss_average=average, loss_impl=loss_impl)
    results = []
    for batch in (collate(examples, tokenizer.pad_token_id),
                  collate_packed(bins, tokenizer.pad_token_id)):
        tiny_model.zero_grad(set_to_none=True)
        loss, n_tok, n_steps = module.loss(batch)
        loss.backward()
        results.append((loss.item(), n_tok, n_steps,
                        tiny_model.model.layers[0].self_attn.q_proj.weight.grad.clone()))
    (a, ta, sa, ga), (b, tb, sb, gb) = results
    assert b == pytest.approx(a, abs=1e-5) and (tb, sb) == (ta, sa)
    torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_training_with_packing(tmp_path):
    from atlas.jobs.train import train
    from tests.helpers import compose_train

    summary = train(compose_train(tmp_path, "data.loader.packing=true",
                                  "data.loader.pack_length=4096", "trainer.max_epochs=1"))
    # one optimizer step per packed row: fewer than the examples
    assert 1 <= summary["global_step"] < summary["selection"]["train/examples"]
    assert summary["metrics"]["train/loss"] > 0


def test_a_bad_pack_length_is_refused(tokenizer):
    from atlas.data.datamodule import TrajectoryDataModule

    with pytest.raises(ValueError, match="pack_length must be >= 1"):
        TrajectoryDataModule([], [], tokenizer, packing=True, pack_length=0)


def test_length_grouped_batches_carry_less_padding_and_every_example_once(tokenizer):
    from atlas.data.datamodule import LengthGroupedSampler, TrajectoryDataModule

    trajs = [t.with_selection(range(t.num_steps)) for t in
             read_trajectories("pkg://atlas/data/default/babyai.jsonl")[:40] +
             read_trajectories("pkg://atlas/data/default/wordle.jsonl")[:40]]

    def padding(group_by_length: bool, seed: int = 0) -> tuple[float, list[int]]:
        data = TrajectoryDataModule(trajs, [], tokenizer, batch_size=4,
                                    group_by_length=group_by_length, seed=seed)
        data.setup("fit")
        pad, total = 0, 0
        for batch in data.train_dataloader():
            pad += int((batch["attention_mask"] == 0).sum())
            total += batch["attention_mask"].numel()
        loader = data.train_dataloader()
        order = list(loader.sampler) if group_by_length else []
        return pad / total, order

    grouped, order = padding(True)
    shuffled, _ = padding(False)
    assert sorted(order) == list(range(len(trajs)))
    assert grouped < 0.6 * shuffled, (grouped, shuffled)
    assert padding(True)[1] == order and padding(True, seed=1)[1] != order
    sampler = LengthGroupedSampler([5, 1, 9, 3, 7, 2, 8, 4], batch_size=2, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert sorted(first) == list(range(8)) and list(sampler) != first
    # the longest item comes first (an out-of-memory error shows at the first step)
    assert first[0] == 2
