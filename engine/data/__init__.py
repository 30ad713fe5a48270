"""The data layer: datasets by name, tokenizers, packing, deterministic batches.

Free of ``torch.distributed``: data-parallel ranks are passed in as plain ints. What is
listed in ``__all__`` is the public API that dataset plugins (``data.plugins``) build on.
"""

import importlib

_EXPORTS = {  # name -> module, imported on first use (a tokenising worker needs no torch)
    "Batch": "engine.batch",
    "DATASETS": "engine.data.source",
    "DataError": "engine.data.errors",
    "DataSource": "engine.data.source",
    "IGNORE_INDEX": "engine.batch",
    "JsonTokenizer": "engine.data.tokenizer",
    "OmniSample": "engine.data.omni_packing",
    "PackedTextDataset": "engine.data.packing",
    "PromptEncoder": "engine.data.user_data",
    "PushBackIterator": "engine.data.omni_packing",
    "Tokenizer": "engine.data.tokenizer",
    "TokenizerError": "engine.data.tokenizer",
    "build_once": "engine.data.cache",
    "build_text_dataset": "engine.data.text_dataset",
    "build_train_data": "engine.data.sources",
    "cu_seqlens_from_doc_ids": "engine.data.packing",
    "doc_starts_from_eos": "engine.data.packing",
    "ensure_corpus": "engine.data.corpus",
    "register_corpus_fetcher": "engine.data.corpus",
    "file_lock": "engine.data.cache",
    "fill_rows": "engine.data.omni_packing",
    "get_dataset": "engine.data.source",
    "load_documents": "engine.data.corpus",
    "load_or_tokenize": "engine.data.packing",
    "load_or_train_tokenizer": "engine.data.tokenizer",
    "load_tokenizer": "engine.data.tokenizer",
    "micro_batches": "engine.data.packing",
    "micro_batches_of_rows": "engine.data.omni_packing",
    "mrope_positions": "engine.data.mrope",
    "packed_mrope_positions": "engine.data.mrope",
    "pack_rows": "engine.data.omni_packing",
    "prepare_data": "engine.data.sources",
    "register_dataset": "engine.data.source",
    "text_stream": "engine.data.sources",
}


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'engine.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DATASETS",
    "Batch",
    "DataError",
    "DataSource",
    "IGNORE_INDEX",
    "JsonTokenizer",
    "OmniSample",
    "PackedTextDataset",
    "PromptEncoder",
    "PushBackIterator",
    "Tokenizer",
    "TokenizerError",
    "build_once",
    "build_text_dataset",
    "build_train_data",
    "cu_seqlens_from_doc_ids",
    "doc_starts_from_eos",
    "ensure_corpus",
    "register_corpus_fetcher",
    "file_lock",
    "fill_rows",
    "get_dataset",
    "load_documents",
    "load_or_tokenize",
    "load_or_train_tokenizer",
    "load_tokenizer",
    "micro_batches",
    "micro_batches_of_rows",
    "mrope_positions",
    "packed_mrope_positions",
    "pack_rows",
    "prepare_data",
    "register_dataset",
    "text_stream",
]
