"""Python client for ghmd, the Gradient Harmonizing Mechanism service.

``ghmd.Client`` talks to a server; ``ghmd.torch`` (needs PyTorch) has drop-in replacements for
mmdetection's GHMC, GHMR, SeesawLoss and EQLV2Loss whose running statistic lives in ghmd, shared
by every rank.
"""

from ._proto import ghm_pb2, ghm_pb2_grpc
from .client import Client, Harmonized, HarmonizeSession, TLSConfig, pack_f32, unpack_f32
from .errors import GhmdError, HealingError, RunLostError

__all__ = [
    "Client",
    "GhmdError",
    "Harmonized",
    "HarmonizeSession",
    "HealingError",
    "RunLostError",
    "TLSConfig",
    "ghm_pb2",
    "ghm_pb2_grpc",
    "pack_f32",
    "unpack_f32",
]
__version__ = "0.1.0"
