"""Fused linear cross-entropy (engine/ops/fused_loss.py, `model.fused_loss`): the chunked path
gives the plain path's loss and gradients (fp32, 1e-6) for the op, the text head (untied and
tied embeddings, ignored labels, per-source loss groups) and the image decoder's head."""

import pytest
import torch
import torch.nn.functional as F

from engine.batch import IGNORE_INDEX, Batch
from engine.config import Config, ConfigError, ModelConfig
from engine.config_validation import validate
from engine.models import build_backbone
from engine.modalities.image_vq import ImageVQDecoder
from engine.ops import fused_loss
from engine.ops.fused_loss import chunk_rows, linear_cross_entropy, resolve

REL = 1e-6


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks of a few rows, so that every test goes through several (the default is 64 MiB of logits)."""
    monkeypatch.setattr(fused_loss, "CHUNK_BYTES", 4 << 10)


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = REL) -> None:
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def grads_of(loss: torch.Tensor, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, tensors))


@pytest.mark.parametrize("with_bias", [False, True])
def test_op_matches_plain_cross_entropy(with_bias):
    torch.manual_seed(0)
    n, h, v = 300, 16, 1000
    assert chunk_rows(v, h, n) < n // 4  # several chunks
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.3).requires_grad_()
    bias = torch.randn(v, requires_grad=True) if with_bias else None
    labels = torch.randint(0, v, (n,))
    labels[::5] = IGNORE_INDEX
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    ref = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_rows = F.cross_entropy(F.linear(hidden, weight, bias), labels, ignore_index=IGNORE_INDEX, reduction="none")
    loss, rows = linear_cross_entropy(hidden, weight, labels, bias, setting="chunked", per_token=True)
    close(loss, ref)
    close(rows, ref_rows.detach())
    assert rows[::5].abs().max() == 0 and not rows.requires_grad
    for got, want in zip(grads_of(0.7 * loss, inputs), grads_of(0.7 * ref, inputs)):
        close(got, want)
    with torch.no_grad():  # evaluation: the loss only
        close(linear_cross_entropy(hidden, weight, labels, bias, setting="chunked")[0], ref.detach())


def test_op_edge_cases():
    weight = torch.randn(64, 8, requires_grad=True)
    hidden = torch.randn(5, 8, requires_grad=True)
    loss, _ = linear_cross_entropy(hidden, weight, torch.full((5,), IGNORE_INDEX), setting="chunked")
    assert loss.item() == 0.0
    loss.backward()
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0
    empty, _ = linear_cross_entropy(hidden[:0], weight, torch.zeros(0, dtype=torch.long), setting="chunked")
    assert empty.item() == 0.0  # a rank with no target rows
    assert resolve("auto", "cpu") == "chunked" and resolve("off", "cuda") == "plain"


def _dense(tie: bool, fused: str) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, tie_embeddings=tie, fused_loss=fused)
    return build_backbone(cfg)


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_text_head_matches_plain(tie):
    plain, fused = _dense(tie, "off"), _dense(tie, "chunked")
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 24), generator=g)
    labels = torch.randint(0, 512, (2, 24), generator=g)
    labels[:, :3] = IGNORE_INDEX
    groups = torch.randint(0, 2, (2, 24), generator=g)
    batch = Batch(input_ids=ids, labels=labels, loss_groups=groups, loss_group_names=("a", "b"))
    ref, got = plain.loss_sums(batch), fused.loss_sums(batch)
    assert ref.keys() == got.keys() == {"lm", "lm/a", "lm/b"}
    for k in ref:
        close(got[k], ref[k].detach())
    close(got["lm/a"] + got["lm/b"], ref["lm"].detach())  # every target is in one group
    ref["lm"].backward()
    got["lm"].backward()
    grads = {n: p.grad for n, p in fused.named_parameters()}
    for name, p in plain.named_parameters():
        close(grads[name], p.grad)


def test_image_decoder_head_matches_plain():
    torch.manual_seed(3)
    dec = ImageVQDecoder(hidden_in=24, num_embeddings=300)
    hidden = torch.randn(40, 24, requires_grad=True)
    labels = torch.randint(0, 300, (40,))
    labels[[1, 4, 8]] = IGNORE_INDEX
    params = [hidden, *dec.generation_head.parameters()]
    ref, logits = dec.lm_head(hidden, labels)
    got, none = dec.lm_head(hidden, labels, fused_loss="chunked")
    assert logits.shape == (40, 300) and none is None
    close(got, ref.detach())
    for a, b in zip(grads_of(got, params), grads_of(ref, params)):
        close(a, b)


def test_liger_on_a_machine_without_cuda_is_a_config_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = Config()
    cfg.model.fused_loss = "liger"
    with pytest.raises(ConfigError, match="model.fused_loss.*liger.*use --model.fused_loss=auto"):
        validate(cfg)
    cfg.model.fused_loss = "fast"
    with pytest.raises(ConfigError, match="model.fused_loss.*must be one of auto, liger, chunked, off"):
        validate(cfg)
