"""One call from a cache directory to a ready-to-batch text dataset."""

from __future__ import annotations

import logging
from pathlib import Path

from engine.data.corpus import ensure_corpus
from engine.data.packing import PackedTextDataset, doc_starts_from_eos, load_or_tokenize
from engine.data.tokenizer import load_or_train_tokenizer

logger = logging.getLogger(__name__)


def build_text_dataset(
    cache_dir: str | Path, vocab_size: int, seq_len: int, seed: int, tokenizer_kind: str = "sentencepiece"
) -> tuple[PackedTextDataset, object]:
    """Corpus -> tokenizer -> token cache -> packed dataset, each step cached in ``cache_dir``.

    Raises `VocabularyUnreachableError` when the corpus cannot train a tokenizer of
    `tokenizer_kind` with `vocab_size` ids.

    Every rank may call this at the same time: each artifact is built by whichever
    process takes its file lock first, and the others read the finished file.
    """
    cache_dir = Path(cache_dir)
    corpus_path = ensure_corpus(cache_dir)
    tokenizer = load_or_train_tokenizer(cache_dir, tokenizer_kind, vocab_size, corpus_path)
    tokens = load_or_tokenize(cache_dir, tokenizer, corpus_path)
    doc_starts = doc_starts_from_eos(tokens, tokenizer.eos_id)
    dataset = PackedTextDataset(tokens, doc_starts, seq_len=seq_len, seed=seed)
    logger.info(
        "text dataset from %s: %d documents, %d tokens (vocab %d), %d sequences of %d tokens",
        corpus_path, len(doc_starts), len(tokens), tokenizer.vocab_size, len(dataset), seq_len,
    )
    return dataset, tokenizer
