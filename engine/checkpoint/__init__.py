"""Sharded save / load / resume (DCP)."""

from .manager import CheckpointError, CheckpointManager, checkpoint_dir, latest_complete

__all__ = ["CheckpointError", "CheckpointManager", "checkpoint_dir", "latest_complete"]
