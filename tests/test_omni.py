"""The omni model: parts by name, placeholders, recipes, dummy payloads, parity across layouts."""

import pytest
import torch
import yaml

from engine.batch import Batch
from engine.config import ModelConfig, load_config
from engine.data.omni_packing import OmniSample, pack_rows
from engine.data.synthetic_omni import SyntheticOmniData
from engine.models import build_model
from engine.models.omni import placeholder_ids
from launch import ROOT, assert_close, losses, train

OMNI = str(ROOT / "examples" / "configs" / "tiny_omni.yaml")
COMMON = ["--checkpoint.enabled=false"]
UNEVEN = "--data.seq_len=63"  # divisible by neither sp size: the padding path runs too


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return train(tmp_path_factory.mktemp("ref"), 1, *COMMON, UNEVEN, config=OMNI)


def test_reference_trains_all_parts(reference):
    assert len(reference) == 5 and reference[-1]["loss"] < reference[0]["loss"]


# Sync Ulysses is the same placeholder handling as async (the omni model never sees which
# one runs); the sync path has its own parity tests in test_sequence_parallel.py.
@pytest.mark.parametrize("overrides", [
    ["--parallel.dp_shard=2", "--parallel.sp_size=2", "--parallel.sp_async=true"],
], ids=["dp2xsp2-async"])
def test_omni_loss_trace_matches_one_process(reference, tmp_path, overrides):
    records = train(tmp_path, 4, *COMMON, UNEVEN, *overrides, config=OMNI)
    assert_close(losses(records), losses(reference), rel=1e-5)
    assert_close([r["loss_image_vq"] for r in records], [r["loss_image_vq"] for r in reference], rel=1e-5)


def _replicate_config(tmp_path):
    path = tmp_path / "omni_replicate.yaml"
    text = (ROOT / "examples/configs/tiny_omni.yaml").read_text()
    path.write_text(text.replace("{name: vision,", "{name: vision, recipe: replicate,"))
    return str(path)


def test_replicate_recipe_matches_fsdp(tmp_path):
    config = _replicate_config(tmp_path)
    one = train(tmp_path / "one", 1, *COMMON, config=config)
    two = train(tmp_path / "two", 2, *COMMON, config=config)
    assert_close(losses(two), losses(one), rel=1e-5)
    assert_close([r["grad_norm"] for r in two], [r["grad_norm"] for r in one], rel=1e-5)  # replicas counted once


@pytest.mark.slow
def test_replicate_recipe_in_bf16_under_fsdp_and_hsdp(tmp_path):
    """The replicated part gets FSDP's bf16 policy like every other unit (it used to stay
    fp32 and meet the bf16 projection): losses within bf16 tolerance of the fsdp recipe."""
    bf16 = [*COMMON, "--train.dtype=bf16", "--train.steps=3"]
    fsdp = train(tmp_path / "fsdp", 2, *bf16, config=OMNI)
    replicate = train(tmp_path / "replicate", 2, *bf16, config=_replicate_config(tmp_path))
    hsdp = train(tmp_path / "hsdp", 4, *bf16, "--parallel.dp_replicate=2", config=_replicate_config(tmp_path))
    assert_close(losses(replicate), losses(fsdp), rel=5e-3)
    assert_close(losses(hsdp), losses(fsdp), rel=5e-3)
    assert_close([r["loss_image_vq"] for r in hsdp], [r["loss_image_vq"] for r in fsdp], rel=5e-3)


def _rows_with_vision(cfg, seed):
    with torch.device("meta"):
        model = build_model(cfg.model)
    parts = {**dict(model.encoders.items()), **dict(model.decoders.items())}
    data = SyntheticOmniData(torch.arange(1000).numpy() % 400, parts, placeholder_ids(cfg.model), [], 64, seed)
    return ["vision" in b["payloads"] for b in data.micro_batches(0, 2, 0, 1, 1)]


def test_rank_without_payload_runs_dummy_and_matches(tmp_path):
    """Rank 0's row has an image, rank 1's has none: rank 1 runs the dummy image (collectives
    of the sharded vision encoder stay aligned: no hang) and the loss is the one-process loss."""
    cfg = load_config(OMNI)
    seed = next(s for s in range(200) if _rows_with_vision(cfg, s) == [True, False])
    args = [*COMMON, f"--train.seed={seed}", "--data.global_batch_size=2", "--train.steps=2"]
    one = train(tmp_path / "one", 1, *args, config=OMNI)
    two = train(tmp_path / "two", 2, *args, config=OMNI, timeout=180)
    assert_close(losses(two), losses(one), rel=1e-5)


def _toy_sensor_config(path, data: dict, train_keys: dict, vocab_size: int, channels: int, width: int) -> str:
    """A one-layer model with the toy_sensor part of tests/plugins/toy_sensor.py."""
    model = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2,
             "num_kv_heads": 2, "plugins": [str(ROOT / "tests" / "plugins" / "toy_sensor.py")],
             "encoders": [{"name": "toy_sensor", "channels": channels, "width": width}]}
    path.write_text(yaml.safe_dump({"model": model, "data": data, "train": {**train_keys, "tensorboard": False},
                                    "checkpoint": {"interval": 0}}))
    return str(path)


def test_modality_defined_outside_engine_trains(tmp_path):
    config = _toy_sensor_config(tmp_path / "toy.yaml", {"dataset": "synthetic_omni", "seq_len": 32,
                                                       "global_batch_size": 2}, {"steps": 1}, 512, 5, 8)
    records = train(tmp_path / "out", 1, *COMMON, config=config)
    assert len(records) == 1 and records[0]["loss"] > 0


def test_dataset_defined_outside_engine_trains_through_the_public_contract(tmp_path):
    """data.plugins: a dataset from a file under tests/ (public engine API only), feeding a
    part from another plugin file, learns its task; the data is built without the model."""
    data = {"dataset": "sensor_parity", "plugins": [str(ROOT / "tests" / "plugins" / "sensor_parity_dataset.py")],
            "seq_len": 32, "global_batch_size": 8}
    config = _toy_sensor_config(tmp_path / "sensor.yaml", data, {"steps": 40, "lr": 1.0e-2, "warmup_steps": 2},
                                64, 3, 16)
    records = train(tmp_path / "out", 1, *COMMON, config=config)
    assert losses(records)[0] > 2.0 and sum(losses(records)[-5:]) / 5 < 0.6, losses(records)
    bad = train(tmp_path / "bad", 1, *COMMON, "--data.dataset=sensor_parityy", config=config, expect_rc=2)
    assert "'data.dataset'='sensor_parityy' is not a registered dataset; registered: " in bad[0]["stderr"]
    assert "sensor_parity, shakespeare, synthetic_omni" in bad[0]["stderr"]


def _tiny_cfg(**parts):
    return ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=2,
                       num_kv_heads=2, **parts)


def test_unknown_part_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match=r"unknown encoder 'lidar'.*audio.*vision"):
        build_model(_tiny_cfg(encoders=[{"name": "lidar"}]))
    with pytest.raises(ValueError, match=r"model.encoders\[0\] \(vision\): unknown option\(s\) \['depht'\]"):
        build_model(_tiny_cfg(encoders=[{"name": "vision", "depht": 2}]))


def _vision_model():
    torch.manual_seed(0)
    model = build_model(_tiny_cfg(encoders=[{"name": "vision", "depth": 1, "embed_dim": 32, "num_heads": 2,
                                             "hidden_size": 32, "patch_size": 4}]))
    return model, placeholder_ids(model.cfg)["vision"]


def test_payload_that_does_not_fit_the_encoder_is_a_clear_error():
    model, ph = _vision_model()
    payload = model.encoders["vision"].dummy_payload()
    payload["pixel_values"] = payload["pixel_values"][:, :-1]  # wrong patch width
    ids = torch.tensor([[5] + [ph] * model.encoders["vision"].num_tokens(model.encoders["vision"].dummy_payload()) + [6]])
    batch = Batch(input_ids=ids, payloads={"vision": payload})
    with pytest.raises(ValueError, match="pixel_values"):
        model(batch)


def test_placeholder_count_must_match_payload():
    model, ph = _vision_model()
    enc = model.encoders["vision"]
    payload = enc.dummy_payload()
    n = enc.num_tokens(payload)
    ids = torch.tensor([[5] + [ph] * (n + 1) + [6]])
    batch = Batch(input_ids=ids, payloads={"vision": payload})
    with pytest.raises(ValueError, match=rf"{n + 1} placeholder tokens .* {n} embeddings"):
        model(batch)
    with pytest.raises(ValueError, match=rf"'vision': {n + 1} placeholder tokens but its payloads need {n}"):
        pack_rows([[OmniSample(ids[0].tolist(), [-100] * ids.shape[1], {"vision": [payload]})]], 16, 0,
                  {"vision": ph}, [], {"vision": enc})


def test_encoder_rows_land_on_their_placeholders():
    """Changing the image changes exactly the hidden states at and after its placeholders."""
    model, ph = _vision_model()
    model.eval()
    enc = model.encoders["vision"]
    payload = enc.dummy_payload()
    n = enc.num_tokens(payload)
    sample = OmniSample([7, 8] + [ph] * n + [9, 10], [-100] * (n + 4), {"vision": [payload]})
    batch = pack_rows([[sample]], n + 6, 0, {"vision": ph}, [], {"vision": enc})
    other = batch.replace(payloads={"vision": {**payload, "pixel_values": torch.randn_like(payload["pixel_values"])}})
    emb = {}
    def grab(module, args):
        emb[len(emb)] = args[0]

    hook = model.backbone.blocks["0"].register_forward_pre_hook(grab)
    with torch.no_grad():
        model(batch), model(other)
    hook.remove()
    changed = (emb[0] - emb[1]).abs().sum(-1)[0] > 0
    assert changed.tolist() == [False, False] + [True] * n + [False] * 4
