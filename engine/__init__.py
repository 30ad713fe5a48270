"""omni-engine: a PyTorch-native training engine for omni-modal LLMs.

`engine.load_pretrained(path)` and `engine.load_tokenizer(path)` are imported lazily, so
`import engine` stays free of torch until they are used.
"""

__all__ = ["load_pretrained", "load_tokenizer"]


def __getattr__(name: str):
    if name in __all__:
        from engine.checkpoint import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
