"""Sharded save / load / resume (DCP), Hugging Face import / export, the weights chain."""

from .manager import CheckpointError, CheckpointManager, checkpoint_dir, latest_complete
from .convert import DCPSource  # noqa: E402  (reads a training checkpoint's saved config and tensors)

__all__ = ["CheckpointError", "CheckpointManager", "DCPSource", "checkpoint_dir", "latest_complete"]
