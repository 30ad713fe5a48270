"""Bottom layer: process-group backends and counted collectives. Knows nothing of models."""

from .all_to_all import PendingAllToAll, all_to_all, all_to_all_single_autograd, start_all_to_all, \
    start_all_to_all_single
from .backends import BACKENDS, DistContext, init_distributed, register_backend, shutdown
from .collectives import STATS, CommStats, all_gather_into_tensor, all_reduce, all_reduce_autograd, all_to_all_single, barrier, \
    broadcast_object, reduce_scatter_tensor

__all__ = ["PendingAllToAll", "all_to_all", "all_to_all_single_autograd", "start_all_to_all",
           "start_all_to_all_single", "BACKENDS", "DistContext", "init_distributed", "register_backend", "shutdown", "STATS", "CommStats",
           "all_gather_into_tensor", "all_reduce", "all_reduce_autograd", "all_to_all_single", "barrier", "broadcast_object",
           "reduce_scatter_tensor"]
