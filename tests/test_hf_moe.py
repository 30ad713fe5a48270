"""Qwen3-MoE Hugging Face interop: config mapping, logits and router parity with transformers,
both expert layouts on import, bitwise round trips, and init_from under expert parallelism.

Every reference model is a tiny random transformers Qwen3-MoE built from a config and saved
offline; nothing is downloaded.
"""

import json

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine.checkpoint.convert import export_hf, import_hf
from engine.checkpoint.hf import KeyMismatchError, UnsupportedArchitectureError, WeightFolder, load_weights_
from launch import ROOT, assert_close, losses, train
from safetensors_files import tensors

transformers = pytest.importorskip("transformers")

# 8 experts, top-2; layer 0 dense (mlp_only_layers), layers 1 and 3 MoE, layer 2 dense (decoder_sparse_step=2
# would skip it too, but mlp_only_layers is what Qwen3-MoE checkpoints use).
SHAPES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
              mlp_only_layers=[0, 2], max_position_embeddings=256)


def hf_moe(seed: int = 0, **overrides):
    cfg = transformers.Qwen3MoeConfig(**{**SHAPES, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random norms and a router far from uniform (transformers initialises them flat)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(transformers model, its save_pretrained folder split into several shards)."""
    model = hf_moe(norm_topk_prob=True)
    path = tmp_path_factory.mktemp("moe") / "hf"
    model.save_pretrained(path, max_shard_size="60KB")
    return model, path


def ids(n: int = 2, seq: int = 40, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(1))


# ---- what transformers writes, and the config ------------------------------------------
def test_save_pretrained_writes_per_expert_tensors_and_config_maps(saved):
    _, path = saved
    names = set(tensors(path))
    # transformers 5 keeps experts fused in memory but saves one tensor per expert (hub layout)
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in names
    assert not any(n.endswith("experts.gate_up_proj") for n in names)
    assert len(list(path.glob("model-*.safetensors"))) > 1
    c = WeightFolder(path).model_config()
    assert (c.backbone, c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob) == \
        ("moe", 8, 2, 32, True)
    assert (c.mlp_only_layers, c.decoder_sparse_step, c.qk_norm, c.attention_bias, c.head_dim) == \
        ([0, 2], 1, True, False, 32)
    assert c.router_aux_loss_coef == pytest.approx(0.001) and c.intermediate_size == 96


# ---- parity with transformers ----------------------------------------------------------
@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_logits_match_transformers(saved, tmp_path, norm_topk_prob):
    if norm_topk_prob:
        ref, path = saved
    else:  # transformers' default (Qwen3-30B-A3B sets true); decoder_sparse_step=2: layers 1, 3 MoE
        ref, path = hf_moe(seed=1, norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[]), tmp_path / "hf"
        ref.save_pretrained(path)
    ours = engine.load_pretrained(path)
    assert sorted(ours.moe_layers()) == ["blocks.1.mlp", "blocks.3.mlp"]
    with torch.no_grad():
        diff = (ref(ids()).logits - ours(ids())).abs().max().item()
    assert diff <= 1e-4, diff


def test_router_top_k_matches_transformers(saved):
    ref, path = saved
    ours = engine.load_pretrained(path)
    x = torch.randn(64, SHAPES["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for layer in (1, 3):
            hf_logits, hf_weight, hf_idx = ref.model.layers[layer].mlp.gate(x)
            logits, _, idx, weight = ours.blocks[str(layer)].mlp.route(x)
            assert torch.equal(idx, hf_idx)
            assert (weight - hf_weight).abs().max().item() <= 1e-6
            assert (logits - hf_logits).abs().max().item() <= 1e-6
            assert torch.allclose(weight.sum(-1), torch.ones(64))  # norm_topk_prob


def test_fused_expert_files_load_the_same(saved, tmp_path):
    """A file with transformers' in-memory names (experts.gate_up_proj [E, 2I, H]) is accepted too."""
    ref, _ = saved
    fused = tmp_path / "fused"
    fused.mkdir()
    ref.config.save_pretrained(fused)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(fused / "model.safetensors"),
              metadata={"format": "pt"})
    assert "model.layers.1.mlp.experts.gate_up_proj" in tensors(fused)
    ours = engine.load_pretrained(fused)
    with torch.no_grad():
        assert torch.equal(ours.blocks["1"].mlp.experts.gate_up_proj, ref.model.layers[1].mlp.experts.gate_up_proj)
        assert (ref(ids()).logits - ours(ids())).abs().max().item() <= 1e-4
    out = export_hf(fused, tmp_path / "exported")  # export writes the per-expert form from either
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(back(ids()).logits, ref(ids()).logits)


# ---- round trip ------------------------------------------------------------------------
def test_round_trip_is_bitwise(saved, tmp_path):
    ref, path = saved
    imported = import_hf(path, tmp_path / "imported")
    inside = tensors(imported)
    assert inside["blocks.1.mlp.experts.gate_up_proj"].shape == (8, 64, 64)  # stored fused, our names
    assert torch.equal(inside["blocks.3.mlp.experts.down_proj"], ref.model.layers[3].mlp.experts.down_proj)
    out = export_hf(imported, tmp_path / "exported", max_shard_size=50_000)
    original, exported = tensors(path), tensors(out)
    assert sorted(original) == sorted(exported)
    for k, t in original.items():
        assert t.dtype == exported[k].dtype and torch.equal(t, exported[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"] and cfg["num_local_experts"] == 8
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(ref) and back.config.norm_topk_prob and back.config.mlp_only_layers == [0, 2]
    with torch.no_grad():
        assert torch.equal(back(ids()).logits, ref(ids()).logits)


# ---- expert parallelism ----------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_ep_rank_loads_only_its_experts(saved, tmp_path, fused):
    """Under EP a rank's expert tensors are rows [r * E/ep, (r+1) * E/ep) of the checkpoint's."""
    from engine.models import build_backbone
    from engine.parallel.expert_parallel import shard_experts

    ref, path = saved
    if fused:
        path = tmp_path / "fused"
        path.mkdir()
        ref.config.save_pretrained(path)
        save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path / "model.safetensors"))
    cfg = WeightFolder(path).model_config()
    for rank in range(4):
        with torch.device("meta"):
            model = build_backbone(cfg)
        shard_experts(model.moe_layers(), rank, 4)
        model.to_empty(device="cpu")
        load_weights_(model, path, expect=cfg)
        for layer in (1, 3):
            want, got = ref.model.layers[layer].mlp.experts, model.blocks[str(layer)].mlp.experts
            assert got.gate_up_proj.shape[0] == 2
            assert torch.equal(got.gate_up_proj, want.gate_up_proj[2 * rank:2 * rank + 2])
            assert torch.equal(got.down_proj, want.down_proj[2 * rank:2 * rank + 2])


@pytest.fixture(scope="module")
def tiny_moe_hf(tmp_path_factory):
    """A transformers Qwen3-MoE with tiny_moe.yaml's shapes (vocab 512 = the data tokenizer's)."""
    path = tmp_path_factory.mktemp("tiny_moe") / "hf"
    model = hf_moe(vocab_size=512, hidden_size=64, intermediate_size=176, moe_intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0], norm_topk_prob=True)
    model.save_pretrained(path, max_shard_size="100KB")
    return path


def test_init_from_under_expert_parallelism_matches_one_process(tiny_moe_hf, tmp_path):
    """2 ranks, ep_size=2, init_from the raw HF folder: the first loss is the one-process loss of
    the Hugging Face weights on the first batch (computed here the trainer's way), so every rank
    took its own experts' rows and nothing fell back to a random init."""
    from engine.config import expand_path, load_config
    from engine.data import build_text_dataset
    from engine.data.packing import micro_batches
    from engine.training.trainer import token_loss_sum

    moe = str(ROOT / "examples" / "configs" / "tiny_moe.yaml")
    ep = train(tmp_path / "ep", 2, "--train.steps=1", "--checkpoint.enabled=false", "--model.qk_norm=true",
               f"--model.init_from={tiny_moe_hf}", "--parallel.ep_size=2", config=moe)
    cfg = load_config(moe)
    dataset, _ = build_text_dataset(expand_path(cfg.data.cache_dir), 512, cfg.data.seq_len, cfg.train.seed)
    (batch,) = micro_batches(dataset, 0, cfg.data.global_batch_size, 0, 1, cfg.data.global_batch_size)
    model = engine.load_pretrained(tiny_moe_hf)
    with torch.no_grad():
        logits = model(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    expected = token_loss_sum(logits, batch["labels"]).item() / int((batch["labels"] != -100).sum())
    assert_close(losses(ep), [expected], rel=1e-5)


# ---- errors ----------------------------------------------------------------------------
def test_missing_expert_and_unexportable_moe_are_one_line_errors(saved, tmp_path):
    ref, path = saved
    sd = tensors(path)
    del sd["model.layers.3.mlp.experts.5.up_proj.weight"]
    broken = tmp_path / "broken"
    broken.mkdir()
    ref.config.save_pretrained(broken)
    save_file(sd, str(broken / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(KeyMismatchError) as e:
        engine.load_pretrained(broken)
    assert "model.layers.3.mlp.experts.5.up_proj.weight" in str(e.value) and "\n" not in str(e.value)
    ours = engine.load_pretrained(path)
    with pytest.raises(ValueError) as e:  # the run's config disagrees on what the MoE computes
        load_weights_(ours, path, expect=ours.cfg.__class__(**{**ours.cfg.__dict__, "norm_topk_prob": False}))
    assert "--model.norm_topk_prob=True" in str(e.value)
    from engine.checkpoint.hf import hf_architecture
    with pytest.raises(UnsupportedArchitectureError) as e:
        hf_architecture(ours.cfg.__class__(**{**ours.cfg.__dict__, "qk_norm": False}))
    assert "Qwen3MoeForCausalLM" in str(e.value) and "model.qk_norm=true" in str(e.value)
