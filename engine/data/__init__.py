"""Text data layer: corpus, tokenizer, packed sequences, deterministic batches.

Free of ``torch.distributed``: data-parallel ranks are passed in as plain ints.
"""

from engine.data.corpus import ensure_corpus, load_documents
from engine.data.packing import (
    IGNORE_INDEX,
    PackedTextDataset,
    cu_seqlens_from_doc_ids,
    doc_starts_from_eos,
    load_or_tokenize,
    micro_batches,
)
from engine.data.text_dataset import build_text_dataset
from engine.data.tokenizer import Tokenizer

__all__ = [
    "IGNORE_INDEX",
    "PackedTextDataset",
    "Tokenizer",
    "build_text_dataset",
    "cu_seqlens_from_doc_ids",
    "doc_starts_from_eos",
    "ensure_corpus",
    "load_documents",
    "load_or_tokenize",
    "micro_batches",
]
