"""One call from a cache directory to a ready-to-batch text dataset."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.data.corpus import ensure_corpus
from engine.data.packing import PackedTextDataset, doc_starts_from_eos, load_or_tokenize
from engine.data.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


def build_text_dataset(
    cache_dir: str | Path, vocab_size: int, seq_len: int, seed: int
) -> tuple[PackedTextDataset, Tokenizer]:
    """Corpus -> tokenizer -> token cache -> packed dataset, each step cached in ``cache_dir``.

    Every rank may call this at the same time: each artifact is built by whichever
    process takes its file lock first, and the others read the finished file.
    """
    cache_dir = Path(cache_dir)
    corpus_path = ensure_corpus(cache_dir)
    tokenizer = Tokenizer.load_or_train(cache_dir, vocab_size, corpus_path)
    tokens = load_or_tokenize(cache_dir, tokenizer, corpus_path)
    doc_starts = doc_starts_from_eos(tokens, tokenizer.eos_id)
    dataset = PackedTextDataset(tokens, doc_starts, seq_len=seq_len, seed=seed)
    logger.info(
        "text dataset from %s: %d documents, %d tokens (vocab %d), %d sequences of %d tokens",
        corpus_path, len(doc_starts), len(tokens), tokenizer.vocab_size, len(dataset), seq_len,
    )
    return dataset, tokenizer
