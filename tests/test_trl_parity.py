"""atlas's objective equals TRL's SFTTrainer loss on the same masks (the benchmark's premise:
bench/trl_compare.py compares their cost, so their losses must be the same)."""

import sys

import pytest
import torch

from atlas.data.datamodule import collate
from atlas.data.masking import encode
from atlas.model import load_model, load_tokenizer
from atlas.module import AtlasLM
from tests.helpers import CONF, ROOT, TOKENIZER

sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.parametrize("ratio", [0.3, 1.0])
@pytest.mark.parametrize("loss_impl", ["gathered", "full"])
def test_atlas_and_trl_give_the_same_loss(tmp_path, ratio, loss_impl):
    from datasets import Dataset
    from omegaconf import OmegaConf
    from trl import SFTConfig, SFTTrainer

    from trl_compare import full_example, selected

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "tiny_llama.yaml"))
    torch.manual_seed(0)
    model = load_model(**cfg)
    tokenizer = load_tokenizer(str(TOKENIZER))
    trajectories = selected(4, ratio)
    rows = [full_example(t, tokenizer) for t in trajectories]
    trainer = SFTTrainer(model=model, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         args=SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                                        max_length=None,
                                        dataset_kwargs={"skip_prepare_dataset": True}))
    module = AtlasLM(model, loss_impl=loss_impl)
    for t, row in zip(trajectories, rows):
        ours = module.loss(collate([encode(t, tokenizer)], tokenizer.pad_token_id))[0]
        with torch.no_grad():
            theirs = trainer.compute_loss(model, trainer.data_collator([row]))
        assert ours.item() == pytest.approx(theirs.item(), abs=1e-4), t.id
    # the cut tail is really gone from atlas's input, and TRL got the whole trajectory
    assert len(encode(trajectories[0], tokenizer).input_ids) <= len(rows[0]["input_ids"])
