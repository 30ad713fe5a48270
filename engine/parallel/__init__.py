"""Parallel layer: meshes, FSDP/HSDP, activation checkpointing, materialisation, plans."""

from .dims import Meshes, ParallelDims
from .init import materialize
from .plan import parallelize

__all__ = ["Meshes", "ParallelDims", "materialize", "parallelize"]
