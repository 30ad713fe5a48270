"""Per-part `init_from`: an encoder starts from a Hugging Face checkpoint of its own (here a
tiny random Qwen2-VL saved with transformers), under one process and under FSDP."""

import inspect

import pytest
import torch
import yaml

from engine.checkpoint import CheckpointError
from engine.comm import init_distributed, shutdown
from engine.config import load_config
from engine.modalities.vision import _HF_OPTIONS, VisionEncoder
from engine.training.trainer import Trainer
from launch import ROOT, assert_close, losses, train

transformers = pytest.importorskip("transformers")

OMNI = ROOT / "examples" / "configs" / "tiny_omni.yaml"
COMMON = ["--checkpoint.enabled=false", "--train.steps=2"]


def config_with_vision_init_from(tmp_path, source) -> str:
    raw = yaml.safe_load(OMNI.read_text())
    vision = next(s for s in raw["model"]["encoders"] if s["name"] == "vision")
    vision["init_from"] = str(source)
    path = tmp_path / "omni_init_from.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A Qwen2-VL checkpoint whose vision tower has tiny_omni.yaml's vision options."""
    raw = yaml.safe_load(OMNI.read_text())
    spec = next(s for s in raw["model"]["encoders"] if s["name"] == "vision")
    defaults = {k: p.default for k, p in inspect.signature(VisionEncoder.__init__).parameters.items()
                if k in _HF_OPTIONS}
    vision = {**defaults, **{k: v for k, v in spec.items() if k in _HF_OPTIONS}}
    vision["mlp_ratio"] = int(vision["mlp_ratio"])  # transformers' config field is an int
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=64, vocab_size=128, bos_token_id=0, eos_token_id=1,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(transformers.Qwen2VLConfig(text_config=text,
                                                                                     vision_config=vision))
    with torch.no_grad():  # nothing left at its default init: norms and biases random too
        for p in model.model.visual.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("qwen2vl")
    model.save_pretrained(folder)
    return folder


def build_trainer(config: str, output_dir) -> Trainer:
    cfg = load_config(config, [("train.output_dir", str(output_dir)), ("checkpoint.enabled", "false")])
    return Trainer(cfg, init_distributed(cfg.parallel.backend, "cpu"))


def test_encoder_starts_from_its_checkpoint(hf_folder, tmp_path):
    expected = VisionEncoder(**VisionEncoder.options_from_hf_config(hf_folder))
    expected.load_hf_weights(hf_folder)
    trainer = build_trainer(config_with_vision_init_from(tmp_path, hf_folder), tmp_path / "run")
    try:
        got = trainer.model.encoders["vision"].state_dict()
        assert got.keys() == expected.state_dict().keys()
        for name, value in expected.state_dict().items():
            assert torch.equal(got[name], value), name
    finally:
        trainer.close()
        shutdown()


def test_missing_or_mismatched_part_checkpoint_is_a_clear_error(hf_folder, tmp_path):
    with pytest.raises(CheckpointError, match=r"model part 'vision' init_from=.*nowhere: no such file"):
        build_trainer(config_with_vision_init_from(tmp_path, tmp_path / "nowhere"), tmp_path / "a")
    shutdown()
    raw = yaml.safe_load(OMNI.read_text())
    vision = next(s for s in raw["model"]["encoders"] if s["name"] == "vision")
    vision.update(init_from=str(hf_folder), depth=2)  # the checkpoint has 1 block
    (tmp_path / "deeper.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(CheckpointError, match=r"model part 'vision' init_from=.*disagrees.*'depth': \(1, 2\)"):
        build_trainer(str(tmp_path / "deeper.yaml"), tmp_path / "b")
    shutdown()


def test_fsdp_ranks_load_their_shards(hf_folder, tmp_path):
    """2 FSDP ranks (the vision tower sharded over both) start from the same weights as one
    process: the same losses; and not from the seeded init."""
    config = config_with_vision_init_from(tmp_path, hf_folder)
    one = train(tmp_path / "one", 1, *COMMON, config=config)
    two = train(tmp_path / "two", 2, *COMMON, config=config)
    assert_close(losses(two), losses(one), rel=1e-5)
    seeded = train(tmp_path / "seeded", 1, *COMMON, config=str(OMNI))
    assert abs(seeded[0]["loss"] - one[0]["loss"]) > 1e-4
