"""omni-engine: a PyTorch-native training engine for omni-modal LLMs.

`engine.load_pretrained(path)` and `engine.load_tokenizer(path)` are imported lazily, so
`import engine` stays free of torch until they are used.
"""

__all__ = ["load_pretrained", "load_tokenizer"]


def __getattr__(name: str):
    if name == "load_pretrained":
        from engine.checkpoint.hf import load_pretrained

        return load_pretrained
    if name == "load_tokenizer":
        from engine.data.tokenizer import load_tokenizer

        return load_tokenizer
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
