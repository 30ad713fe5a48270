"""omni-digits: manifests, skipped samples, strict mode, layout-independent batches, padding."""

import copy as copy_module
import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from engine.config import load_config
from engine.models import build_model
from engine.models.omni import placeholder_ids
from omni_datasets.omni_digits import evaluate as ev
from omni_datasets.omni_digits import source as digits_source
from omni_datasets.omni_digits.build import (BuildOptions, ManifestError, MissingToolError, SampleError, ensure_espeak,
                                             ensure_omni_digits, load_split, parse_wav, read_manifest)
from omni_datasets.omni_digits.source import OmniDigitsData, parse_digits
from omni_datasets.omni_digits.vq_tokenizer import ensure_vq_tokenizer, prepare


def _espeak_available() -> bool:
    """Install espeak-ng the way the dataset builder does (apt-get, as root) before deciding."""
    try:
        ensure_espeak(install=True)
    except (MissingToolError, OSError):
        return False
    return shutil.which("espeak-ng") is not None


HAVE_ESPEAK = _espeak_available()
TINY = BuildOptions(images_per_class=4, voices=("en-us",) if HAVE_ESPEAK else (), variants=("",), speeds=(150, 220),
                    pitches=(50,), sequences_per_combo=1, workers=2)
needs_audio = pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")

CONFIG = textwrap.dedent("""
    model:
      vocab_size: 512
      hidden_size: 32
      intermediate_size: 64
      num_layers: 1
      num_heads: 2
      num_kv_heads: 1
      encoders:
        - {name: vision, depth: 1, embed_dim: 16, num_heads: 1, hidden_size: 16, patch_size: 4, in_channels: 1}
        - {name: audio, num_mel_bins: 16, d_model: 16, encoder_layers: 1, encoder_attention_heads: 1,
           encoder_ffn_dim: 32, max_source_positions: 40, pool_stride: 4}
      decoders:
        - {name: image_vq, image_size: 8, in_channels: 1, channel_multiplier: [1, 1], num_embeddings: 16,
           projection_dim: 16}
    data: {dataset: omni_digits, seq_len: 64, global_batch_size: 4}
""")


class CharTokenizer:
    """Stands in for the sentencepiece tokenizer (no corpus needed): one id per character."""

    pad_id, eos_id = 0, 3

    def encode(self, text):
        return [4 + (ord(c) if ord(c) < 128 else ord("?")) for c in text]

    def decode(self, ids):
        return "".join(chr(i - 4) for i in ids if i >= 4)


TEXT = (np.arange(5000) % 300 + 4).astype(np.int32)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return ensure_omni_digits(cache, TINY)


@pytest.fixture
def copy(dataset, tmp_path):
    out = tmp_path / "omni_digits_v1"
    shutil.copytree(dataset, out)
    return out


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, dataset):
    path = tmp_path_factory.mktemp("cfg") / "omni_digits_test.yaml"
    path.write_text(CONFIG)
    cfg = load_config(str(path))
    cfg.data.cache_dir = str(dataset.parent)
    return cfg


def make_source(cfg, root, model=None, **kw):
    if model is None:
        with torch.device("meta"):
            model = build_model(cfg.model)
    parts = {**dict(model.encoders.items()), **dict(model.decoders.items())}
    kw.setdefault("seq_len", cfg.data.seq_len)
    return OmniDigitsData(root, CharTokenizer(), TEXT, parts, placeholder_ids(cfg.model), list(model.decoders),
                          seed=0, **kw)


def test_build_is_deterministic_and_split(dataset, tmp_path):
    meta = json.loads((dataset / "meta.json").read_text())
    assert meta["stats"]["train"]["images"] == 30 and meta["stats"]["heldout"]["images"] == 10
    again = ensure_omni_digits(tmp_path, BuildOptions(**{**TINY.__dict__}))
    for split in ("train", "heldout"):
        assert (again / f"{split}.jsonl").read_text() == (dataset / f"{split}.jsonl").read_text()
    train = [r for _, r in read_manifest(dataset / "train.jsonl")]
    held = [r for _, r in read_manifest(dataset / "heldout.jsonl")]
    assert not {r["id"] for r in train} & {r["id"] for r in held}
    if HAVE_ESPEAK:  # held-out voice combinations are never heard in training
        combo = lambda r: (r["voice"], r["variant"], r["speed"], r["pitch"])  # noqa: E731
        assert not {combo(r) for r in train if r["kind"] == "audio"} & {combo(r) for r in held if r["kind"] == "audio"}
        a = np.load(dataset / train[-1]["file"])
        assert np.array_equal(a, np.load(again / train[-1]["file"])) and a.dtype == np.int16
    with pytest.raises(ValueError, match="other options"):
        ensure_omni_digits(tmp_path, BuildOptions(images_per_class=5, voices=()))


def test_parse_wav_tolerates_streamed_header():
    pcm = (np.sin(np.arange(800) / 5) * 1000).astype("<i2").tobytes()
    header = b"RIFF" + b"\xff\xff\xff\x7f" + b"WAVE" + b"fmt " + (16).to_bytes(4, "little") + \
        (1).to_bytes(2, "little") + (1).to_bytes(2, "little") + (22050).to_bytes(4, "little") + \
        (44100).to_bytes(4, "little") + (2).to_bytes(2, "little") + (16).to_bytes(2, "little") + \
        b"data" + b"\xff\xff\xff\x7f"
    x, rate = parse_wav(header + pcm)
    assert rate == 22050 and x.shape == (800,)


@pytest.mark.parametrize("bad", ['{"kind": "image", "file": "images/0000.npy"', '[1, 2]',
                                 '{"kind": "image", "file": "images/0000.npy", "digits": [12]}',
                                 '{"kind": "smell", "file": "x.npy", "digits": [1]}'])
def test_corrupt_manifest_line_names_file_and_line(copy, bad):
    manifest = copy / "train.jsonl"
    lines = manifest.read_text().splitlines()
    lines[2] = bad
    manifest.write_text("\n".join(lines) + "\n")
    with pytest.raises(ManifestError, match=r"train\.jsonl:3: "):
        load_split(copy, "train")


def _truncate_one(copy, kind):
    lines = (copy / "train.jsonl").read_text().splitlines()
    line_no, rec = next((i + 1, json.loads(s)) for i, s in enumerate(lines) if json.loads(s)["kind"] == kind)
    path = copy / rec["file"]
    path.write_bytes(path.read_bytes()[:100] if kind == "image" else b"\x93NUMPY garbage")
    return line_no


def test_truncated_image_and_unreadable_audio_are_skipped_and_counted(copy):
    before, _ = load_split(copy, "train")
    img_line = _truncate_one(copy, "image")
    kinds = ["image"]
    if HAVE_ESPEAK:
        _truncate_one(copy, "audio")
        kinds.append("audio")
    items, skipped = load_split(copy, "train")
    assert len(items) == len(before) - len(kinds)
    assert skipped.counts == {f"unreadable {k} file": 1 for k in kinds}
    assert f"train.jsonl:{img_line}" in skipped.examples[0]
    with pytest.raises(SampleError, match=rf"train\.jsonl:{img_line}: unreadable image file"):
        load_split(copy, "train", strict=True)


@needs_audio
def test_too_long_samples_are_skipped_and_counted(cfg, dataset):
    """Clips over the encoder's window and samples over seq_len are left out."""
    items, _ = load_split(dataset, "train")
    frames = sorted(len(it.data) // 160 for it in items if it.kind == "audio")
    small = copy_module.deepcopy(cfg)
    small.model.encoders[1]["max_source_positions"] = frames[len(frames) // 2] // 2  # half the clips are too long
    data = make_source(small, dataset)
    full = make_source(cfg, dataset, seq_len=4096)
    assert data.skipped.counts.get("audio longer than the audio encoder's window", 0) > 0
    short = make_source(cfg, dataset, seq_len=30)
    n_long = short.skipped.counts.get("sample longer than data.seq_len", 0)
    assert n_long > 0 and len(short.audio_items) + n_long == len(full.audio_items)
    assert all(len(short.build_sample(short.spec_for("audio", (i,)))) <= 30 for i in range(len(short.audio_items)))
    with pytest.raises(SampleError, match=r"train\.jsonl:\d+: "):
        make_source(cfg, dataset, seq_len=30, strict=True)


def test_data_strict_config_key_reaches_the_source(cfg, dataset, monkeypatch):
    """`data.strict` from the config: off, over-long samples are skipped and counted (the
    trainer logs the counts); on, the first one is an error naming its manifest line."""
    from types import SimpleNamespace

    import engine.data.sources as sources

    monkeypatch.setattr(digits_source, "text_stream", lambda cfg: (SimpleNamespace(tokens=TEXT), CharTokenizer()))
    short = copy_module.deepcopy(cfg)
    short.data.seq_len = 30  # "draw the digit 7:" + 16 image codes = 33 tokens
    data = sources.build_train_data(short)  # no model: the parts' shapes come from the config
    assert not data.skipped.strict
    assert sum(n for why, n in data.skipped_counts().items() if "longer than data.seq_len" in why) > 0
    short.data.strict = True
    with pytest.raises(SampleError, match=r"\.jsonl:\d+: .*longer than data\.seq_len"):
        sources.build_train_data(short)


def test_micro_batches_identical_across_dp_layouts(cfg, dataset):
    data = make_source(cfg, dataset)
    keys = ("input_ids", "labels", "position_ids", "doc_ids", "ph_index", "dec_next_index", "dec_next_part")
    for step in (0, 3):
        one = data.micro_batches(step, 4, 0, 1, 4)[0]
        for dp, mb in ((2, 1), (2, 2), (4, 1)):
            rows = [b for r in range(dp) for b in data.micro_batches(step, 4, r, dp, mb)]
            for key in ("input_ids", "labels", "position_ids", "doc_ids"):
                assert torch.equal(torch.cat([b[key] for b in rows]), one[key]), (dp, mb, key)
            pix = [b["payloads"]["vision"]["pixel_values"] for b in rows if "vision" in b["payloads"]]
            assert torch.equal(torch.cat(pix), one["payloads"]["vision"]["pixel_values"])
            img = [b["payloads"]["image_vq"]["pixel_values"] for b in rows if "image_vq" in b["payloads"]]
            assert torch.equal(torch.cat(img), one["payloads"]["image_vq"]["pixel_values"])
        single = [b for r in range(4) for b in data.micro_batches(step, 4, r, 4, 1)]
        again = [b for r in range(4) for b in data.micro_batches(step, 4, r, 4, 1)]
        for a, b in zip(single, again):
            for key in keys:
                assert torch.equal(a[key], b[key])
    assert not torch.equal(data.micro_batches(0, 4, 0, 1, 4)[0]["input_ids"],
                           data.micro_batches(1, 4, 0, 1, 4)[0]["input_ids"])


def test_padding_waste_is_reported_and_small(cfg, dataset):
    data = make_source(cfg, dataset)
    pads = real = 0
    for step in range(5):
        for b in data.micro_batches(step, 4, 0, 1, 2):
            rows, seq = b["input_ids"].shape
            pad_doc = b["doc_ids"] == b["doc_ids"].max(dim=1, keepdim=True).values
            assert int(b["padding_tokens"]) <= rows  # at most one padding token per row
            assert int(b["padding_tokens"]) == int((pad_doc & (b["input_ids"] == 0) & (b["labels"] == -100)).sum())
            pads, real = pads + int(b["padding_tokens"]), real + rows * seq - int(b["padding_tokens"])
    assert pads / (pads + real) <= 0.02
    no_fill = make_source(cfg, dataset, fill_text=False)
    b = no_fill.micro_batches(0, 4, 0, 1, 4)[0]
    pad_doc = b["doc_ids"] == b["doc_ids"].max(dim=1, keepdim=True).values
    assert int(b["padding_tokens"]) == int((pad_doc & (b["input_ids"] == 0)).sum()) > 4


def test_tasks_and_answers(cfg, dataset):
    data = make_source(cfg, dataset, seq_len=128)
    tok = data.tokenizer
    seen = set()
    for r in range(8):
        for s in data.row(0, r):
            kind = next(iter(s.payloads), "text")
            seen.add(kind)
            assert len(s.tokens) == len(s.labels)
            if kind == "vision":
                targets = [t for t in s.labels if t != -100]
                assert parse_digits(tok.decode(targets)) and targets[-1] == tok.eos_id
    assert {"vision", "image_vq", "text"} <= seen
    assert parse_digits(" seven") == [7] and parse_digits("it is seven.") == [7]
    assert parse_digits(" 3 5 1") == [3, 5, 1]


def test_vq_tokenizer_cached_and_loaded_through_init_from(cfg, dataset, monkeypatch):
    """The prepare step trains the VQ tokenizer once, caches it, and names it as the
    decoder's init_from; the decoder's own loader reads it (no data source writes weights)."""
    from safetensors.torch import load_file

    spec = cfg.model.decoders[0]
    path = ensure_vq_tokenizer(dataset, spec, train={"steps": 2, "batch_size": 4})
    assert path.is_file() and ensure_vq_tokenizer(dataset, spec, train={"steps": 2, "batch_size": 4}) == path
    state = load_file(str(path))
    assert state and all(k.startswith("vqmodel.") for k in state)
    model = build_model(cfg.model)
    loaded = model.decoders["image_vq"].load_hf_weights(path)
    vq = model.decoders["image_vq"]
    assert sorted(loaded) == sorted(state) and all(torch.equal(vq.get_parameter(k), state[k]) for k in loaded
                                                   if k in dict(vq.named_parameters()))
    from engine.data import prepare_data
    from omni_datasets.omni_digits import vq_tokenizer

    monkeypatch.setattr(vq_tokenizer, "VQ_TRAIN", {**vq_tokenizer.VQ_TRAIN, "steps": 2, "batch_size": 4})
    assert prepare(cfg) == {"image_vq": str(path)}  # cached: the file above
    prepared = prepare_data(cfg)  # the trainer's first stage: the path becomes the decoder's init_from
    assert prepared.model.decoders[0]["init_from"] == str(path) and "init_from" not in cfg.model.decoders[0]


def test_eval_embeddings_match_the_model_forward(cfg, dataset):
    """The evaluation tool builds the inputs as OmniModel.forward does: same text loss."""
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    data = make_source(cfg, dataset, model=model)
    batch = data.micro_batches(0, 2, 0, 1, 2)[0]
    with torch.no_grad():
        sums = model(batch)
        emb = ev.embed_batch(model, batch)
        hidden = model.backbone(position_ids=batch["position_ids"], doc_ids=batch["doc_ids"], inputs_embeds=emb,
                                return_hidden=True)
        text = model._text_targets(batch["labels"])
        lm = torch.nn.functional.cross_entropy(model.backbone.logits(hidden[text]), batch["labels"][text],
                                               reduction="sum")
    assert torch.allclose(lm, sums["lm"], rtol=1e-5)
    specs = [data.spec_for("image", (i,)) for i in range(3)]
    out = ev.greedy_text(model, data, [data.build_sample(s, with_answer=False) for s in specs], 300, max_new=3)
    assert len(out) == 3 and all(len(o) <= 3 for o in out)


@pytest.mark.skipif(not HAVE_ESPEAK, reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_packed_and_padded_batches_give_the_same_loss(cfg, dataset):
    """The same samples (every task, audio included), packed several to a row or one per
    padded row: the same LM and image-decoder loss sums and target counts (fp32)."""
    from engine.data import pack_rows

    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    data = make_source(cfg, dataset, model=model)
    rows = [data.row(0, r) for r in range(4)]
    samples = [s for row in rows for s in row]
    assert sum(len(row) > 1 for row in rows) >= 2, "the test needs rows that hold several samples"
    kinds = {name for s in samples for name in s.payloads}
    assert kinds == {"vision", "audio", "image_vq"}, kinds

    def pack(groups):
        return pack_rows(groups, cfg.data.seq_len, 0, data.ph, data.decoders, data.parts)

    packed, padded = pack(rows), pack([[s] for s in samples])
    def real(b):
        return b["input_ids"].numel() - int(b["padding_tokens"])

    assert real(packed) == real(padded)
    assert padded["input_ids"].shape[0] == len(samples) > packed["input_ids"].shape[0]
    assert model.target_counts(packed) == model.target_counts(padded)
    with torch.no_grad():
        a, b = model(packed), model(padded)
    assert set(a) == {"lm", "image_vq"}
    for key in a:
        assert a[key] > 0
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=0, msg=f"loss {key}")
