"""image_vq decoder: parity with transformers' JanusVQVAE (codes exact, pixels <= 1e-4), the
LM-facing parts against Janus's generation modules, the head's loss, tokenizer pre-training,
and user errors."""

import pytest
import torch
import torch.nn.functional as F

from engine.modalities.image_vq import ImageVQDecoder, reconstruction_error, train_vqvae
from engine.modalities.registry import get_decoder

transformers = pytest.importorskip("transformers")
from transformers import JanusConfig, JanusForConditionalGeneration, JanusVQVAE, JanusVQVAEConfig  # noqa: E402

VQ = dict(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32, channel_multiplier=[1, 1, 2],
          num_res_blocks=1, projection_dim=48, image_token_embed_dim=40, num_patches=4)


def _spread(model: torch.nn.Module) -> None:
    """HF inits everything at std 0.02, which makes near-constant outputs: use fan-in scaled
    weights so that codes are diverse and the pixel comparison means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)


@pytest.fixture(scope="module")
def hf_vq():
    torch.manual_seed(0)
    model = JanusVQVAE(JanusVQVAEConfig(**VQ)).eval()
    _spread(model)
    return model


def test_registered():
    assert get_decoder("image_vq") is ImageVQDecoder
    dec = get_decoder("image_vq")()
    assert dec.vocab_size == 256 and dec.codes_per_image == 16 and dec.embed_dim == 64
    emb, ids = dec.lm_encode(dec.dummy_payload())
    assert emb.shape == (16, dec.embed_dim) and ids.shape == (16,) and dec.num_tokens(dec.dummy_payload()) == 16


def test_codes_and_pixels_match_janus(hf_vq):
    ours = ImageVQDecoder.from_hf_config(hf_vq.config)
    loaded = ours.load_hf_weights(hf_vq.state_dict())
    assert len(loaded) == len(hf_vq.state_dict()) and all(n.startswith("vqmodel.") for n in loaded)
    torch.manual_seed(1)
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        ref = hf_vq.encode(x).image_tokens.view(5, -1)
        ref_px = hf_vq.decode(ref)
        ref_roundtrip = hf_vq(x)[0]
    ids = ours.encode_codes(x)
    assert ids.shape == (5, 16) and torch.equal(ids, ref)
    assert ref.unique().numel() > 8  # a meaningful comparison, not one code everywhere
    with torch.no_grad():
        px = ours.lm_generate(ids, clamp=False)
        assert (px - ref_px).abs().max().item() <= 1e-4
        assert (ours.lm_generate(ids.flatten(), clamp=False) - ref_roundtrip).abs().max().item() <= 1e-4
        clamped = ours.lm_generate(ids)
    assert ref_px.abs().max() > 1 and clamped.abs().max() <= 1  # lm_generate clamps by default

    emb, flat = ours.lm_encode({"pixel_values": x})
    assert torch.equal(flat, ref.flatten()) and emb.shape == (80, ours.embed_dim)
    assert emb.requires_grad and not any(p.requires_grad for p in ours.vqmodel.parameters())


def test_full_janus_folder(tmp_path):
    """An HF folder of a whole Janus model: VQ-VAE under model.vqmodel., generation parts too."""
    torch.manual_seed(2)
    cfg = JanusConfig(
        text_config=dict(model_type="llama", hidden_size=40, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=100),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=4),
        vq_config=VQ)
    hf = JanusForConditionalGeneration(cfg).eval()
    _spread(hf.model.vqmodel)
    hf.save_pretrained(tmp_path)
    ours = ImageVQDecoder.from_hf_config(cfg)
    assert ours.hidden_in == 40 and ours.image_size == 16
    loaded = ours.load_hf_weights(tmp_path)
    assert any(n.startswith("generation_head.") for n in loaded)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    hidden = torch.randn(7, 40)
    with torch.no_grad():
        ref_ids = hf.model.vqmodel.encode(x).image_tokens
        emb, ids = ours.lm_encode({"pixel_values": x})
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(emb, hf.prepare_embeddings_for_image_generation(ref_ids), rtol=1e-5, atol=1e-6)
        _, logits = ours.lm_head(hidden, torch.zeros(7, dtype=torch.long))
        torch.testing.assert_close(logits, hf.model.generation_head(hidden), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.lm_generate(ids.view(2, -1), clamp=False),
                                   hf.decode_image_tokens(ids.view(2, -1)).permute(0, 3, 1, 2), rtol=0, atol=1e-4)
    # a bare JanusVQVAE folder / "vqmodel." prefixed dicts load too
    bare = {k[len("model.vqmodel."):]: v for k, v in hf.state_dict().items() if k.startswith("model.vqmodel.")}
    ImageVQDecoder.from_hf_config(cfg).load_hf_weights({"vqmodel." + k: v for k, v in bare.items()})
    hf.model.vqmodel.save_pretrained(tmp_path / "vq")
    again = ImageVQDecoder.from_hf_config(cfg)
    again.load_hf_weights(tmp_path / "vq")
    assert torch.equal(again.encode_codes(x).flatten(), ref_ids)


def test_lm_head_loss_and_ignore_index():
    torch.manual_seed(3)
    dec = ImageVQDecoder(hidden_in=24, num_embeddings=50)
    hidden = torch.randn(9, 24, requires_grad=True)
    labels = torch.randint(0, 50, (9,))
    labels[[1, 4, 8]] = -100
    loss, logits = dec.lm_head(hidden, labels)
    assert logits.shape == (9, 50)
    keep = labels != -100
    ref = F.cross_entropy(logits[keep], labels[keep], reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, reduction="sum"), rtol=1e-6, atol=1e-6)
    loss.backward()
    assert hidden.grad[~keep].abs().max() == 0 and hidden.grad[keep].abs().max() > 0
    empty, _ = dec.lm_head(hidden, torch.full((9,), -100))
    assert empty.item() == 0.0
    none, logits = dec.lm_head(hidden[:0], labels[:0])  # a rank with no code positions
    assert none.item() == 0.0 and logits.shape == (0, 50)
    dec.set_hidden_in(32)  # the omni model sets the head's width to the backbone's
    assert dec.lm_head(torch.randn(2, 32), torch.tensor([0, 1]))[1].shape == (2, 50)


def _shapes(n: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """Synthetic 1-channel images in [-1, 1]: filled rectangles on a dark background."""
    g = torch.Generator().manual_seed(seed)
    out = -torch.ones(n, 1, size, size)
    for i in range(n):
        r0, c0 = torch.randint(0, size - 2, (2,), generator=g).tolist()
        r1 = torch.randint(r0 + 2, size + 1, (1,), generator=g).item()
        c1 = torch.randint(c0 + 2, size + 1, (1,), generator=g).item()
        out[i, :, r0:r1, c0:c1] = 1.0
    return out


def _tiny_gray(**kw) -> ImageVQDecoder:
    torch.manual_seed(4)
    return ImageVQDecoder(in_channels=1, image_size=8, channel_multiplier=(1, 1), num_embeddings=64, **kw)


def test_train_vqvae_on_shapes():
    dec = _tiny_gray()
    images = _shapes(256)
    before = reconstruction_error(dec, images)
    history = train_vqvae(dec, images, steps=30, lr=2e-3, batch_size=16)
    after = reconstruction_error(dec, images)
    assert len(history) == 30 and sum(history[-5:]) / 5 < 0.5 * history[0]
    assert after < 0.4 * before, (before, after)
    # the frozen flags are restored; what was trained is what the discrete path decodes
    assert not any(p.requires_grad for p in dec.vqmodel.parameters()) and not dec.vqmodel.training
    assert torch.allclose(dec.vqmodel.quantize.embedding.weight.norm(dim=-1), torch.ones(64), atol=1e-5)


def test_train_vqvae_on_digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = torch.tensor(datasets.load_digits().images, dtype=torch.float32)[:, None] / 16 * 2 - 1
    dec = _tiny_gray(train_vqvae=True)
    before = reconstruction_error(dec, digits[:256])
    train_vqvae(dec, digits, steps=30, lr=2e-3, batch_size=16)
    after = reconstruction_error(dec, digits[:256])
    assert after < 0.4 * before, (before, after)
    assert all(p.requires_grad for p in dec.vqmodel.parameters())  # train_vqvae=True stays trainable


def test_payload_errors():
    dec = ImageVQDecoder()
    with pytest.raises(ValueError, match="pixel_values"):
        dec.check_payload({"pixels": torch.zeros(1, 3, 16, 16)})
    with pytest.raises(ValueError, match=r"\(2, 1, 16, 16\).*1 channels.*\[num_images, 3, 16, 16\]"):
        dec.lm_encode({"pixel_values": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*resolution 32x32.*\[num_images, 3, 16, 16\]"):
        dec.num_tokens({"pixel_values": torch.zeros(2, 3, 32, 32)})
    with pytest.raises(ValueError, match="4-D"):
        dec.check_payload({"pixel_values": torch.zeros(3, 16, 16)})
    with pytest.raises(ValueError, match="floating"):
        dec.check_payload({"pixel_values": torch.zeros(1, 3, 16, 16, dtype=torch.long)})
    with pytest.raises(ValueError, match=r"token_ids has shape \(2, 15\)"):
        dec.lm_generate(torch.zeros(2, 15, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        dec.lm_generate(torch.full((1, 16), 256))
    with pytest.raises(ValueError, match="hidden_in=64"):
        dec.lm_head(torch.zeros(3, 32), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        dec.lm_head(torch.zeros(3, 64), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of 32"):
        ImageVQDecoder(base_channels=48)
    with pytest.raises(ValueError, match="image_size = 18"):
        ImageVQDecoder(image_size=18)
    with pytest.raises(ValueError, match="double_latent"):
        ImageVQDecoder.from_hf_config(dict(VQ, double_latent=True))


def test_load_errors(hf_vq, tmp_path):
    sd = hf_vq.state_dict()
    ours = ImageVQDecoder.from_hf_config(hf_vq.config)
    bad = dict(sd)
    bad.pop("encoder.conv_in.weight")
    with pytest.raises(ValueError, match=r"missing \['encoder.conv_in.weight'\]"):
        ours.load_hf_weights(bad)
    with pytest.raises(ValueError, match=r"unexpected \['encoder.extra.weight'\]"):
        ours.load_hf_weights(dict(sd, **{"encoder.extra.weight": torch.zeros(1)}))
    with pytest.raises(ValueError, match=r"quantize.embedding.weight -> .*checkpoint \(64, 8\), model \(128, 8\)"):
        ImageVQDecoder.from_hf_config(hf_vq.config, num_embeddings=128).load_hf_weights(sd)
    with pytest.raises(ValueError, match="no VQ-VAE weights"):
        ours.load_hf_weights({"model.language_model.embed_tokens.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="generation weights"):
        ours.load_hf_weights(dict({"vqmodel." + k: v for k, v in sd.items()},
                                  **{"generation_embeddings.weight": torch.zeros(64, 8)}))
    with pytest.raises(ValueError, match="neither"):
        ours.load_hf_weights(tmp_path / "nothing")
