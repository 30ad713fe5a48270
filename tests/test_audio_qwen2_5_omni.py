"""The `qwen2_5_omni_audio` encoder against transformers' Qwen2.5-Omni thinker audio tower on the
same (tiny, random, scaled-up) weights, fed as the thinker feeds it (`get_audio_features`)."""

import functools
import inspect

import numpy as np
import pytest
import torch

from engine.models.part_specs import build_part
from engine.modalities import call_part, log_mel
from engine.modalities.audio_qwen2_5_omni import Qwen2_5OmniAudioEncoder as Ours
from engine.modalities.registry import get_encoder

transformers = pytest.importorskip("transformers")
from transformers import (Qwen2_5OmniAudioEncoderConfig, Qwen2_5OmniConfig, Qwen2_5OmniThinkerConfig,  # noqa: E402
                          Qwen2_5OmniThinkerForConditionalGeneration)
from transformers.models.qwen2_5_omni import processing_qwen2_5_omni  # noqa: E402
from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder  # noqa: E402

MELS, D, OUT = 16, 32, 24
AUDIO = dict(num_mel_bins=MELS, d_model=D, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
             max_source_positions=30, n_window=5, output_dim=OUT)
TEXT = dict(vocab_size=64, hidden_size=OUT, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                    "mrope_section": [1, 1, 1]})
VISION = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=OUT,
              fullatt_block_indexes=[0])


@functools.cache
def thinker(n_window: int = 5) -> Qwen2_5OmniThinkerForConditionalGeneration:
    """A tiny random thinker whose audio tower has large weights and non-trivial norms/biases,
    so that any slip (a chunk boundary, a position, the pool) shows in the output."""
    torch.manual_seed(n_window)
    cfg = Qwen2_5OmniThinkerConfig(audio_config={**AUDIO, "n_window": n_window}, text_config=TEXT,
                                   vision_config=VISION)
    model = Qwen2_5OmniThinkerForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for p in model.model.audio_tower.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 1.0 if p.ndim == 1 else torch.randn_like(p) * 0.3)
    return model


def ours(n_window: int = 5, **kw) -> Ours:
    enc = Ours(**{**AUDIO, "n_window": n_window, **kw}).eval()
    enc.load_hf_weights(thinker(n_window).state_dict())   # transformers 5 names: model.audio_tower.*
    return enc


def layouts(lens, frames=None, seed=0):
    """(our payload with loud garbage in the padding, transformers' padded features and
    feature_attention_mask as the processor hands them to the thinker)."""
    g = torch.Generator().manual_seed(seed)
    frames = frames or max(lens)
    x = torch.randn(len(lens), MELS, frames, generator=g)
    mask = (torch.arange(frames) < torch.tensor(lens)[:, None]).long()
    garbage = x + 10.0 * torch.randn(x.shape, generator=g) * (1 - mask[:, None, :])
    return {"input_features": garbage, "feature_lens": torch.tensor(lens)}, x, mask


def reference(n_window, x, mask):
    with torch.no_grad():
        return thinker(n_window).get_audio_features(x, feature_attention_mask=mask).last_hidden_state


def test_registered_and_names_match_transformers():
    assert get_encoder("qwen2_5_omni_audio") is Ours and Ours.media == ("audio",)
    enc = Ours(**AUDIO)
    assert enc.out_dim == OUT and enc.min_frames == 3 and enc.max_frames == 3000
    theirs = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(**AUDIO)).state_dict()
    assert {k: tuple(v.shape) for k, v in enc.state_dict().items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    # defaults are the released config's (Qwen2_5OmniAudioEncoderConfig's)
    defaults = {k: p.default for k, p in inspect.signature(Ours.__init__).parameters.items() if k in AUDIO}
    assert defaults == {k: getattr(Qwen2_5OmniAudioEncoderConfig(), k) for k in AUDIO}


@torch.no_grad()
@pytest.mark.parametrize("n_window", [5, 4])
@pytest.mark.parametrize("lens", [[37], [40], [43, 7, 23, 10, 3, 26], [7, 3, 6]],
                         ids=["one", "one-whole-chunks", "several", "all-within-one-chunk"])
def test_matches_thinker_audio_features(n_window, lens):
    """Clips not a multiple of the chunk (2 * n_window frames), shorter than one, spanning several,
    of exactly whole chunks, and of the minimum 3 frames, with a batch's clips all within one chunk;
    n_window odd makes pool pairs straddle chunk boundaries."""
    enc = ours(n_window)
    p, x, mask = layouts(lens, frames=max(lens) + 5)
    ref = reference(n_window, x, mask)
    out = enc.lm_encode(p)
    assert out.shape == ref.shape == (enc.num_tokens(p), OUT)
    assert ref.abs().max() > 1.0
    err = (out - ref).abs().max().item()
    assert err < 1e-4, err
    # each clip alone gives its rows of the batch, whatever padding follows it
    alone = [enc.lm_encode({"input_features": x[i:i + 1, :, :n], "feature_lens": torch.tensor([n])})
             for i, n in enumerate(lens)]
    assert [a.shape[0] for a in alone] == enc.tokens_per_clip(torch.tensor(lens)).tolist()
    assert (torch.cat(alone) - out).abs().max() < 1e-5
    merged = enc.collate([{"input_features": x[i:i + 1, :, :n], "feature_lens": torch.tensor([n])}
                          for i, n in enumerate(lens)])
    assert (call_part(enc, "lm_encode", merged) - out).abs().max() < 1e-5


def test_tokens_per_clip_is_transformers_and_processor_rule():
    enc = Ours(**AUDIO)
    frames = torch.arange(0, 3001)
    tower = thinker().model.audio_tower
    assert torch.equal(enc.tokens_per_clip(frames), tower._get_feat_extract_output_lengths(frames)[1])
    assert torch.equal(enc.tokens_per_clip(frames), processing_qwen2_5_omni._get_feat_extract_output_lengths(frames))
    assert enc.tokens_per_clip(torch.tensor([2, 3, 4, 5, 6, 3000])).tolist() == [0, 1, 1, 1, 1, 750]
    # the encoder's actual output length agrees, lengths around chunk boundaries included
    lens = [3, 4, 5, 9, 10, 11, 19, 20, 21, 22, 57]
    p, x, mask = layouts(lens)
    with torch.no_grad():
        ref = thinker().get_audio_features(x, feature_attention_mask=mask).last_hidden_state
    assert ref.shape[0] == enc.num_tokens(p) == int(enc.tokens_per_clip(torch.tensor(lens)).sum())


@torch.no_grad()
def test_load_hf_weights_prefixes_and_folders(tmp_path):
    model = thinker()
    tower = model.model.audio_tower
    p, x, mask = layouts([43, 7, 23])
    want = reference(5, x, mask)
    bare = tower.state_dict()
    sources = {"thinker checkpoint (thinker.audio_tower.)": {f"thinker.audio_tower.{k}": v for k, v in bare.items()},
               "saved thinker (audio_tower.)": {f"audio_tower.{k}": v for k, v in bare.items()},
               "transformers 5 thinker (model.audio_tower.)": model.state_dict(),
               "transformers 5 full model (thinker.model.audio_tower.)":
                   {f"thinker.{k}": v for k, v in model.state_dict().items()},
               "bare encoder": bare}
    model.save_pretrained(tmp_path / "thinker")              # safetensors keys audio_tower.*, config: audio_config
    tower.save_pretrained(tmp_path / "tower")                # no prefix, the audio config alone
    sources.update({"thinker folder": tmp_path / "thinker", "encoder folder": str(tmp_path / "tower"),
                    "safetensors file": tmp_path / "thinker" / "model.safetensors"})
    for what, source in sources.items():
        enc = Ours(**AUDIO).eval()
        enc.load_hf_weights(source)
        assert (enc.lm_encode(p) - want).abs().max() < 1e-4, what
    # strict: names and shapes in the error
    with pytest.raises(ValueError, match=r"missing \['ln_post.bias'\]"):
        Ours(**AUDIO).load_hf_weights({k: v for k, v in bare.items() if k != "ln_post.bias"})
    with pytest.raises(ValueError, match=r"unexpected \['layers.2.fc1.weight'\]"):
        Ours(**AUDIO).load_hf_weights({**bare, "layers.2.fc1.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"prefix 'thinker.audio_tower.'.*missing \['audio_bos_eos_token.weight'\]"):
        Ours(**AUDIO).load_hf_weights({k: v for k, v in sources["thinker checkpoint (thinker.audio_tower.)"].items()
                                       if "audio_bos_eos" not in k})
    with pytest.raises(ValueError, match=r"tensor audio_tower.layers.0.fc1.weight has shape \(64, 32\) in the "
                                         r"checkpoint, \(48, 32\) in the module"):
        Ours(**{**AUDIO, "encoder_ffn_dim": 48}).load_hf_weights(sources["saved thinker (audio_tower.)"])
    with pytest.raises(ValueError, match=r"config.json disagrees.*'n_window': \(5, 4\)"):
        Ours(**{**AUDIO, "n_window": 4}).load_hf_weights(tmp_path / "thinker")
    with pytest.raises(ValueError, match="does not exist"):
        Ours(**AUDIO).load_hf_weights(tmp_path / "nowhere")


def test_from_hf_config(tmp_path):
    Qwen2_5OmniConfig(thinker_config={"audio_config": AUDIO}).save_pretrained(tmp_path)   # a full config.json
    assert Ours.options_from_hf_config(tmp_path) == AUDIO
    assert Ours.options_from_hf_config(tmp_path / "config.json") == AUDIO
    thinker_cfg = Qwen2_5OmniThinkerConfig(audio_config=AUDIO, text_config=TEXT, vision_config=VISION)
    audio_cfg = Qwen2_5OmniAudioEncoderConfig(**AUDIO)
    for config in (thinker_cfg, thinker_cfg.to_dict(), audio_cfg, audio_cfg.to_dict()):
        assert Ours.options_from_hf_config(config) == AUDIO
    enc = Ours.from_hf_config(audio_cfg, max_frames=600)
    assert (enc.n_window, enc.out_dim, enc.max_frames, len(enc.layers)) == (5, OUT, 600, 2)
    with pytest.raises(ValueError, match="'relu'"):
        Ours.from_hf_config({**AUDIO, "activation_function": "relu"})
    with pytest.raises(ValueError, match="no audio encoder config"):
        Ours.options_from_hf_config({"text_config": TEXT})
    with pytest.raises(ValueError, match="n_window=40 > max_source_positions=30"):
        Ours(**{**AUDIO, "n_window": 40})


def test_built_through_engine_dummy_backward_errors():
    enc = build_part("encoders", 0, {"name": "qwen2_5_omni_audio", **AUDIO})
    assert isinstance(enc, Ours) and enc.out_dim == OUT
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['pool_stride'\]"):
        build_part("encoders", 0, {"name": "qwen2_5_omni_audio", "pool_stride": 2})
    p = enc.dummy_payload("cpu")
    out = call_part(enc, "lm_encode", p)
    assert out.shape == (enc.num_tokens(p), OUT) == (1, OUT)
    (out ** 2).sum().backward()
    assert enc.conv1.weight.grad is not None and enc.conv1.bias.grad.abs().sum() > 0   # (zero input: weight grad 0)
    assert not enc.audio_bos_eos_token.weight.requires_grad and enc.audio_bos_eos_token.weight.grad is None
    good = {"input_features": torch.zeros(2, MELS, 40), "feature_lens": torch.tensor([40, 12])}
    enc.check_payload(good)
    bad = {
        "num_mel_bins=16": {**good, "input_features": torch.zeros(2, 8, 40)},
        r"feature_lens out of range.*\[12, 41\]": {**good, "feature_lens": torch.tensor([41, 12])},
        r"feature_lens out of range.*\[2, 40\].*at least 3 frames": {**good, "feature_lens": torch.tensor([40, 2])},
        r"feature_lens has shape \(3,\)": {**good, "feature_lens": torch.tensor([40, 12, 3])},
        r"feature_lens has shape \(2,\) \(torch.int32\)": {**good, "feature_lens": torch.tensor([40, 12]).int()},
        "lacks key 'feature_lens'": {"input_features": good["input_features"]},
        "no clips": {"input_features": torch.zeros(0, MELS, 40), "feature_lens": torch.zeros(0, dtype=torch.long)},
    }
    for msg, payload in bad.items():
        with pytest.raises(ValueError, match=msg):
            enc.lm_encode(payload)
    short = Ours(**AUDIO, max_frames=30)
    with pytest.raises(ValueError, match="max_frames=30"):
        short.lm_encode(good)


@torch.no_grad()
def test_meta_init_and_log_mel():
    """Built on meta and materialised by init_param_ (as the engine does): nothing is lost,
    the positions are computed, not stored."""
    with torch.device("meta"):
        enc = Ours(**AUDIO)
    enc.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, t in enc.named_parameters():
        enc.init_param_(name, t, g)
    assert not list(enc.buffers())
    wave = np.sin(np.arange(16000) * 0.05).astype(np.float32)
    feats = enc.log_mel(wave)
    assert torch.equal(feats, log_mel(wave, 16000, MELS)) and feats.shape == (MELS, 100)
    out = enc.lm_encode({"input_features": feats[None], "feature_lens": torch.tensor([100])})
    assert out.shape == (25, OUT) and torch.isfinite(out).all()
