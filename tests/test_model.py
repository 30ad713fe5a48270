"""Backbone numerics: document masking, attention kernels, GQA, RoPE scaling."""

import pytest
import torch

from engine.config import ModelConfig
from engine.models import build_backbone
from engine.ops.attention import AttentionMeta, eager_attention, sdpa_attention, sdpa_by_document


def tiny(**kw):
    cfg = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2)
    cfg.update(kw)
    torch.manual_seed(0)
    model = build_backbone(ModelConfig(**cfg))
    for p in model.parameters():  # larger weights than the default init, so masking errors show
        torch.nn.init.normal_(p, std=0.2)
    return model


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "attention_bias": True}, {"tie_embeddings": True},
                                {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}])
def test_packed_row_equals_documents_run_alone(kw):
    """Two documents packed in one row (doc_ids + restarted positions) == each run on its own."""
    model = tiny(**kw).eval()
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 9))
    packed = torch.cat([a, b], 1)
    pos = torch.cat([torch.arange(7), torch.arange(9)])[None]
    doc = torch.cat([torch.zeros(7), torch.ones(9)]).long()[None]
    with torch.no_grad():
        out = model(packed, pos, doc)
        alone = torch.cat([model(a), model(b)], 1)
        leaky = model(packed)  # without document masking the second document sees the first
    assert torch.allclose(out, alone, atol=1e-5)
    assert not torch.allclose(leaky[:, 7:], alone[:, 7:], atol=1e-3)


@pytest.mark.parametrize("kernel", [sdpa_attention, sdpa_by_document])
def test_sdpa_matches_eager_reference_with_gqa_and_documents(kernel):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 8, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    doc = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    meta = AttentionMeta(doc_ids=doc)
    assert torch.allclose(kernel(q, k, v, meta), eager_attention(q, k, v, AttentionMeta(doc_ids=doc)), atol=1e-5)


def test_varlen_boundaries():
    doc = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 2, 2]])
    cu, max_len = AttentionMeta(doc_ids=doc).varlen()
    assert cu.tolist() == [0, 2, 5, 6, 8, 10] and max_len == 3


@pytest.mark.parametrize("backbone", ["dense", "moe"])
def test_backbones_answer_the_model_contract(backbone):
    """Checked by name: Python 3.12's runtime protocols look members up statically and miss
    nn.Module submodules such as `blocks` (seen on the GPU machine's Python 3.12)."""
    from engine.models.contract import check_contract
    extra = {"backbone": "moe", "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16} \
        if backbone == "moe" else {}
    model = tiny(**extra)
    check_contract(model)
    assert "blocks" in model._modules  # served by nn.Module.__getattr__, invisible to getattr_static


def test_a_model_missing_a_contract_member_is_named():
    from engine.models.contract import check_contract

    class Partial(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleDict()

    with pytest.raises(AssertionError, match="lacks .*'loss_sums'"):
        check_contract(Partial())
