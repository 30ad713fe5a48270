"""The data layer: datasets by name, tokenizers, packing, deterministic batches.

Free of ``torch.distributed``: data-parallel ranks are passed in as plain ints. What is
listed in ``__all__`` is the public API that dataset plugins (``data.plugins``) build on.
"""

from engine.batch import IGNORE_INDEX, Batch
from engine.data.cache import build_once, file_lock
from engine.data.corpus import ensure_corpus, load_documents
from engine.data.errors import DataError
from engine.data.omni_packing import OmniSample, PushBackIterator, fill_rows, micro_batches_of_rows, pack_rows
from engine.data.packing import (
    PackedTextDataset,
    cu_seqlens_from_doc_ids,
    doc_starts_from_eos,
    load_or_tokenize,
    micro_batches,
)
from engine.data.source import DATASETS, DataSource, get_dataset, register_dataset
from engine.data.sources import build_train_data, prepare_data, text_stream
from engine.data.text_dataset import build_text_dataset
from engine.data.tokenizer import JsonTokenizer, Tokenizer, TokenizerError, load_or_train_tokenizer, load_tokenizer

__all__ = [
    "DATASETS",
    "Batch",
    "DataError",
    "DataSource",
    "IGNORE_INDEX",
    "JsonTokenizer",
    "OmniSample",
    "PackedTextDataset",
    "PushBackIterator",
    "Tokenizer",
    "TokenizerError",
    "build_once",
    "build_text_dataset",
    "build_train_data",
    "cu_seqlens_from_doc_ids",
    "doc_starts_from_eos",
    "ensure_corpus",
    "file_lock",
    "fill_rows",
    "get_dataset",
    "load_documents",
    "load_or_tokenize",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "micro_batches",
    "micro_batches_of_rows",
    "pack_rows",
    "prepare_data",
    "register_dataset",
    "text_stream",
]
