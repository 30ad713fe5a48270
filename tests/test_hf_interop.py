"""Hugging Face interop: logits parity, bitwise round trips, FSDP training from HF weights, errors.

Every reference model is a tiny random transformers model built from a config and saved
offline; nothing is downloaded.
"""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.checkpoint.convert import export_hf, import_hf
from engine.checkpoint.hf import (HFCheckpointError, KeyMismatchError, MissingShardError, ShapeMismatchError,
                                  UnsupportedArchitectureError, load_weights_)
from launch import TINY, assert_close, losses, tool, train
from safetensors_files import tensors

transformers = pytest.importorskip("transformers")

SHAPES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
ARCHS = {
    "llama": ("LlamaConfig", dict(rope_scaling=LLAMA3_ROPE, rope_theta=50000.0)),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(head_dim=32)),  # explicit head_dim != hidden / heads
}


def hf_model(arch: str, seed: int = 0, **overrides):
    cls, extra = ARCHS[arch]
    cfg = getattr(transformers, cls)(**{**SHAPES, **extra, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms and biases too (transformers initialises them to 1 and 0)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


def save_hf(tmp_path: Path, arch: str, shard: str | None = None, **overrides) -> tuple[object, Path]:
    model = hf_model(arch, **overrides)
    path = tmp_path / f"hf_{arch}"
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    return model, path


def edit_config(path: Path, **changes) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


# ---- parity with transformers ----------------------------------------------------------
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_logits_match_transformers(arch, tmp_path):
    ref, path = save_hf(tmp_path, arch, shard="40KB" if arch == "llama" else None)
    if arch == "llama":
        assert (path / "model.safetensors.index.json").is_file()  # really sharded
    ours = engine.load_pretrained(path)
    c = ours.cfg
    assert (c.qk_norm, c.attention_bias, c.tie_embeddings) == {"llama": (False, False, False),
                                                              "qwen2": (False, True, True),
                                                              "qwen3": (True, False, False)}[arch]
    if arch == "llama":
        assert c.rope_scaling["rope_type"] == "llama3" and c.rope_theta == 50000.0
    ids = torch.randint(0, SHAPES["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ref(ids).logits - ours(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_packed_documents_match_separate_transformers_runs(tmp_path):
    """Two documents packed in one row (doc_ids + restarting positions) = each run alone by transformers."""
    ref, path = save_hf(tmp_path, "qwen3")
    ours = engine.load_pretrained(path)
    a, b = torch.randint(0, 128, (1, 20)), torch.randint(0, 128, (1, 28))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(20), torch.arange(28)])[None]
    doc = torch.cat([torch.zeros(20, dtype=torch.long), torch.ones(28, dtype=torch.long)])[None]
    with torch.no_grad():
        got = ours(packed, pos, doc)
        want = torch.cat([ref(a).logits, ref(b).logits], 1)
    assert (got - want).abs().max().item() <= 1e-4


# ---- round trip ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_round_trip_is_bitwise(arch, tmp_path):
    ref, path = save_hf(tmp_path, arch, shard="40KB")
    (path / "tokenizer.json").write_text("{}")  # stands for the model's tokenizer files: copied through
    imported = import_hf(path, tmp_path / "imported")
    out = export_hf(imported, tmp_path / "exported", max_shard_size=60_000)
    original, exported = tensors(path), tensors(out)
    assert sorted(original) == sorted(exported)
    for k, t in original.items():
        assert t.dtype == exported[k].dtype and torch.equal(t, exported[k]), k
    assert (out / "model.safetensors.index.json").is_file() and (out / "tokenizer.json").is_file()
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref)
    ids = torch.randint(0, 128, (2, 32))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, ref(ids).logits)


# ---- training from imported weights ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_import(tmp_path_factory):
    """A transformers Llama with tiny_dense.yaml's shapes (vocab 512 = the data tokenizer's), imported."""
    tmp = tmp_path_factory.mktemp("tiny")
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                                   initializer_range=0.2)  # far from our init, so a silent fallback would show
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp / "hf", max_shard_size="100KB")
    return tmp, import_hf(tmp / "hf", tmp / "imported")


@pytest.fixture(scope="module")
def fsdp_run(tiny_import):
    tmp, imported = tiny_import
    one = train(tmp / "one", 1, "--train.steps=1", f"--model.init_from={imported}", "--checkpoint.enabled=false")
    two = train(tmp / "two", 2, "--train.steps=1", f"--model.init_from={tmp / 'hf'}")  # raw HF folder works too
    return one, two, tmp / "two" / "checkpoints" / "step_00000001"


def test_fsdp_training_from_imported_weights_matches_one_process(tiny_import, fsdp_run):
    from engine.config import expand_path, load_config
    from engine.data import build_text_dataset
    from engine.data.packing import micro_batches
    from engine.training.trainer import token_loss_sum

    one, two, _ = fsdp_run
    assert_close(losses(two), losses(one), rel=1e-5)
    # The first loss is the imported model's loss on the first batch (not a random init's).
    cfg = load_config(TINY)
    dataset, _ = build_text_dataset(expand_path(cfg.data.cache_dir), 512, cfg.data.seq_len, cfg.train.seed)
    (batch,) = micro_batches(dataset, 0, cfg.data.global_batch_size, 0, 1, cfg.data.global_batch_size)
    model = engine.load_pretrained(tiny_import[1])
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    expected = token_loss_sum(logits, batch["labels"]).item() / int((batch["labels"] != -100).sum())
    assert_close(losses(one), [expected], rel=1e-5)


def test_export_of_sharded_training_checkpoint_loads_in_transformers(fsdp_run, tmp_path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    *_, step_dir = fsdp_run
    out = export_hf(step_dir, tmp_path / "exported", config=TINY, max_shard_size=100_000)
    assert len(list(out.glob("model-*.safetensors"))) > 1
    dcp_to_torch_save(step_dir, tmp_path / "full.pt")  # torch's own reader, as the reference
    trained = torch.load(tmp_path / "full.pt", weights_only=True)["model"]
    exported = tensors(out)
    assert len(exported) == len(trained)
    for k, t in trained.items():
        hf_name = k.replace("blocks.", "model.layers.") if k.startswith("blocks.") else \
            k if k.startswith("lm_head") else "model." + k
        assert torch.equal(exported[hf_name], t), k
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = engine.load_pretrained(out)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-4
    # The data tokenizer travels with the export and transformers reads it the same way.
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ourtok = engine.load_tokenizer(out)
    text = "ROMEO.\nBut soft, what light through yonder window breaks?"
    assert tok.encode(text, add_special_tokens=False) == ourtok.encode(text)
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == ourtok.eos_id


def test_cli_export_without_config_uses_the_saved_one(fsdp_run, tmp_path):
    *_, step_dir = fsdp_run
    assert run_cli("export", str(step_dir), str(tmp_path / "out"), "--dtype", "bfloat16") == 0
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in tensors(tmp_path / "out").values())


# ---- tokenizers ------------------------------------------------------------------------
def test_load_tokenizer_json_and_sentencepiece(tmp_path):
    import sentencepiece as spm
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 50
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"]))
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>"}))
    loaded = engine.load_tokenizer(tmp_path)
    assert loaded.decode(loaded.encode(text[0])) == text[0] and loaded.eos_id == 1

    for pad in (0, -1):  # ours (pad id set) and a Llama-2-style model without pad
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=buf, vocab_size=32,
                                       pad_id=pad, unk_id=1, bos_id=2, eos_id=3, minloglevel=2)
        model = tmp_path / f"sp{pad}.model"
        model.write_bytes(buf.getvalue())
        sp = engine.load_tokenizer(model)
        assert sp.vocab_size == 32 and sp.decode(sp.encode(text[1])) == text[1]
        assert sp.pad_id == (0 if pad == 0 else None)


# ---- errors ----------------------------------------------------------------------------
def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, ValueError)
    return msg


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    _, path = save_hf(tmp_path, "llama")
    edit_config(path, architectures=["MixtralForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as e:
        engine.load_pretrained(path)
    msg = one_line(e)
    assert "MixtralForCausalLM" in msg and all(a in msg for a in ("LlamaForCausalLM", "Qwen2ForCausalLM",
                                                                  "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"))


def test_missing_shard_is_named(tmp_path):
    _, path = save_hf(tmp_path, "llama", shard="40KB")
    victim = sorted(path.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(MissingShardError) as e:
        engine.load_pretrained(path)
    assert victim.name in one_line(e)
    (path / "model.safetensors.index.json").unlink()  # without the index, the shard names still tell
    with pytest.raises(MissingShardError) as e:
        engine.load_pretrained(path)
    assert victim.name in one_line(e)


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    _, path = save_hf(tmp_path, "llama")
    edit_config(path, intermediate_size=128)
    with pytest.raises(ShapeMismatchError) as e:
        engine.load_pretrained(path)
    msg = one_line(e)
    assert "model.layers.0.mlp.gate_proj.weight" in msg and "(96, 64)" in msg and "(128, 64)" in msg


def test_unexpected_and_missing_keys(tmp_path):
    _, path = save_hf(tmp_path, "qwen3")
    edit_config(path, num_hidden_layers=1)
    with pytest.raises(KeyMismatchError) as e:
        engine.load_pretrained(path)
    assert "unexpected" in one_line(e) and "model.layers.1." in str(e.value)
    edit_config(path, num_hidden_layers=2)
    sd = tensors(path)
    del sd["model.layers.0.self_attn.q_norm.weight"]
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyMismatchError) as e:
        engine.load_pretrained(path)
    assert "lacks 1 tensor" in one_line(e) and "model.layers.0.self_attn.q_norm.weight" in str(e.value)


def test_pickle_only_folder_and_config_mismatch_are_clear(tmp_path):
    model, path = save_hf(tmp_path, "llama")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(path / "config.json", pickled)
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(HFCheckpointError) as e:
        engine.load_pretrained(pickled)
    assert "pytorch_model.bin" in one_line(e) and "safetensors" in str(e.value)
    ours = engine.load_pretrained(path)
    wrong = ours.cfg.__class__(**{**ours.cfg.__dict__, "rope_theta": 10000.0})
    with pytest.raises(HFCheckpointError) as e:  # shapes agree, the computation would not
        load_weights_(ours, path, expect=wrong)
    assert "--model.rope_theta=50000.0" in one_line(e)


def test_export_with_the_wrong_config_is_a_shape_error(tiny_import, tmp_path):
    _, imported = tiny_import
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("intermediate_size: 176", "intermediate_size: 128"))
    with pytest.raises(ShapeMismatchError) as e:
        export_hf(imported, tmp_path / "out", config=str(bad))
    assert "(176, 64)" in one_line(e) and "(128, 64)" in str(e.value)
    assert run_cli("export", str(imported), str(tmp_path / "out"), "--config", str(bad)) == 2


def run_cli(*argv: str) -> int:
    return tool("convert_hf_checkpoint").main(list(argv))
