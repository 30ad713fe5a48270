"""The `audio` encoder against transformers' Whisper on the same (tiny, random) weights."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from engine.modalities import call_part
from engine.modalities.audio import AudioEncoder, log_mel, mel_filters, sinusoids
from engine.modalities.registry import get_encoder

transformers = pytest.importorskip("transformers")
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration  # noqa: E402

MELS, D, LAYERS, HEADS, FFN, POS = 80, 64, 2, 4, 128, 50   # 2 * POS = 100 frames
OPTS = dict(num_mel_bins=MELS, d_model=D, encoder_layers=LAYERS, encoder_attention_heads=HEADS,
            encoder_ffn_dim=FFN, max_source_positions=POS)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(WhisperForConditionalGeneration, its saved folder): tiny, random, built offline."""
    torch.manual_seed(0)
    cfg = WhisperConfig(**OPTS, decoder_layers=1, decoder_attention_heads=HEADS, decoder_ffn_dim=FFN,
                        max_target_positions=16, vocab_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                        decoder_start_token_id=3, suppress_tokens=[], begin_suppress_tokens=[])
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that a missed tensor shows
        for name, p in model.model.encoder.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("whisper")
    model.save_pretrained(folder)
    return model, folder


def ours(source, pool_stride=2, **kw) -> AudioEncoder:
    enc = AudioEncoder(**{**OPTS, **kw}, pool_stride=pool_stride).eval()
    enc.load_hf_weights(source)
    return enc


def payload(x, lens=None):
    lens = torch.full((x.shape[0],), x.shape[2]) if lens is None else torch.as_tensor(lens)
    return {"input_features": x, "feature_lens": lens.long()}


def test_registered():
    assert get_encoder("audio") is AudioEncoder
    assert AudioEncoder(**OPTS).out_dim == D


@torch.no_grad()
def test_matches_whisper_encoder_per_frame_and_pooled(hf):
    model, folder = hf
    x = torch.randn(3, MELS, 2 * POS)
    ref = model.model.encoder(x).last_hidden_state                       # [3, 50, 64]
    enc = ours(folder, pool_stride=1)                                      # from the HF folder (model.encoder.*)
    out = enc.lm_encode(payload(x))
    assert out.shape == (3 * POS, D) and enc.num_tokens(payload(x)) == 3 * POS
    assert (out.view(3, POS, D) - ref).abs().max() <= 1e-4
    # pooled: every source layout loads, and the output is avg-pooling of Whisper's
    pooled_ref = F.avg_pool1d(ref.transpose(1, 2), 2, 2).transpose(1, 2).reshape(-1, D)
    sources = {"WhisperModel": model.model.state_dict(), "WhisperForConditionalGeneration": model.state_dict(),
               "WhisperEncoder": model.model.encoder.state_dict()}
    for what, sd in sources.items():
        out2 = ours(sd, pool_stride=2).lm_encode(payload(x))
        assert out2.shape == (3 * POS // 2, D), what
        assert (out2 - pooled_ref).abs().max() <= 1e-4, what


@torch.no_grad()
@pytest.mark.parametrize("pool_stride", [1, 2])
def test_padding_does_not_change_a_clip(hf, pool_stride):
    enc = ours(hf[1], pool_stride=pool_stride)
    lens = [37, 100, 60, 2 * pool_stride - 1, 8]
    clips = [torch.randn(1, MELS, n) for n in lens]
    batch = torch.randn(len(lens), MELS, 100) * 3.0   # loud garbage in the padding: it must be masked
    for i, c in enumerate(clips):
        batch[i, :, : c.shape[2]] = c[0]
    p = payload(batch, lens)
    out = enc.lm_encode(p)
    alone = [enc.lm_encode(payload(c)) for c in clips]
    assert [a.shape[0] for a in alone] == enc.tokens_per_clip(torch.tensor(lens)).tolist()
    assert out.shape[0] == enc.num_tokens(p) == sum(a.shape[0] for a in alone)
    assert (out - torch.cat(alone)).abs().max() <= 1e-5
    # payloads of different lengths collate into one (zero-padded) payload with the same tokens
    merged = enc.collate([payload(c) for c in clips])
    assert merged["input_features"].shape == (len(lens), MELS, 100) and merged["feature_lens"].tolist() == lens
    assert (call_part(enc, "lm_encode", merged) - torch.cat(alone)).abs().max() <= 1e-5


def test_log_mel_matches_whisper_feature_extractor():
    sr, n = 16000, 16000
    t = np.arange(n) / sr
    chirp = (0.5 * np.sin(2 * np.pi * (100 * t + 0.5 * (4000 - 100) * t ** 2)) + 0.01 * np.sin(2 * np.pi * 50 * t))
    chirp = chirp.astype(np.float32)
    ref = WhisperFeatureExtractor(feature_size=MELS)(chirp, sampling_rate=sr, return_tensors="np").input_features[0]
    feats = log_mel(chirp, sr, MELS)
    assert feats.shape == (MELS, n // 160) and feats.dtype == torch.float32
    k = n // 160 - 1   # the extractor zero-pads to 30 s: the last frame sees that padding instead of reflection
    assert np.abs(feats[:, :k].numpy() - ref[:, :k]).max() < 2e-4
    assert torch.equal(AudioEncoder(**OPTS).log_mel(torch.from_numpy(chirp)), feats)
    from transformers.audio_utils import mel_filter_bank
    bank = mel_filter_bank(201, MELS, 0.0, 8000.0, sr, norm="slaney", mel_scale="slaney")
    assert np.abs(mel_filters(MELS) - bank).max() < 1e-12


def test_payload_errors():
    enc = AudioEncoder(**OPTS)
    good = payload(torch.zeros(2, MELS, 40), [40, 12])
    enc.check_payload(good)
    bad = {
        "num_mel_bins": payload(torch.zeros(2, 64, 40), [40, 12]),
        "2 \\* max_source_positions = 100": payload(torch.zeros(1, MELS, 101)),
        "feature_lens out of range.*\\[12, 41\\]": payload(torch.zeros(2, MELS, 40), [41, 12]),
        "feature_lens out of range.*\\[2, 40\\]": payload(torch.zeros(2, MELS, 40), [40, 2]),
        "feature_lens has shape \\(3,\\)": payload(torch.zeros(2, MELS, 40), [40, 12, 3]),
        "lacks key 'feature_lens'": {"input_features": torch.zeros(1, MELS, 10)},
    }
    for msg, p in bad.items():
        with pytest.raises(ValueError, match=msg):
            enc.lm_encode(p)
    with pytest.raises(ValueError, match="16000"):
        log_mel(np.zeros(8000, np.float32), sample_rate=8000)


def test_weight_errors(hf):
    model, folder = hf
    sd = model.model.encoder.state_dict()
    with pytest.raises(ValueError, match=r"embed_positions.weight has shape \(50, 64\).*\(40, 64\)"):
        AudioEncoder(**{**OPTS, "max_source_positions": 40}).load_hf_weights(folder)
    with pytest.raises(ValueError, match=r"missing \['layer_norm.bias'\]"):
        AudioEncoder(**OPTS).load_hf_weights({k: v for k, v in sd.items() if k != "layer_norm.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['layers.2.fc1.weight'\]"):
        AudioEncoder(**OPTS).load_hf_weights({**sd, "layers.2.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="model.safetensors"):
        AudioEncoder(**OPTS).load_hf_weights(folder / "nowhere")


def test_dummy_payload_backward_and_init():
    enc = AudioEncoder(**OPTS)
    p = enc.dummy_payload("cpu")
    out = enc.lm_encode(p)
    assert out.shape == (enc.num_tokens(p), D) == (1, D)
    out.sum().backward()
    assert enc.conv1.weight.grad is not None and enc.layers[-1].fc2.weight.grad is not None
    assert not enc.embed_positions.weight.requires_grad
    # built on meta, then materialised by init_param_: positions are Whisper's sinusoids
    with torch.device("meta"):
        meta = AudioEncoder(**OPTS)
    meta.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, t in meta.state_dict().items():
        meta.init_param_(name, t, g)
    assert torch.equal(meta.embed_positions.weight, sinusoids(POS, D))
    assert AudioEncoder.from_hf_config(WhisperConfig(**OPTS), pool_stride=1).embed_positions.weight.shape == (POS, D)
