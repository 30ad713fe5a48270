"""Bottom layer: process-group backends and counted collectives. Knows nothing of models."""

from .backends import BACKENDS, DistContext, init_distributed, register_backend, shutdown
from .collectives import STATS, CommStats, all_gather_into_tensor, all_reduce, all_to_all_single, barrier, \
    broadcast_object, reduce_scatter_tensor

__all__ = ["BACKENDS", "DistContext", "init_distributed", "register_backend", "shutdown", "STATS", "CommStats",
           "all_gather_into_tensor", "all_reduce", "all_to_all_single", "barrier", "broadcast_object",
           "reduce_scatter_tensor"]
