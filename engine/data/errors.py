"""The data layer's user-facing error: `pretrain_omni.py` prints it as one line (exit 2)."""


class DataError(ValueError):
    """Data that cannot be fetched, built or read; the message says what and how to fix it."""
