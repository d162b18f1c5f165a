"""Secure aggregation (SecAgg / SecAgg+) for methods whose server half only needs sums.

Transport-independent: both the edge client and the aggregator drive it by exchanging the byte
messages of `messages`, in the order shown by `loopback.run_loopback`. The server learns the sum of
the surviving clients' quantised inputs and which clients survived, nothing else.
"""

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import (
    MessageFormatError,
    ProtocolError,
    SecAggError,
    ShareDecryptionError,
    TooManyDropoutsError,
    UnmaskRefusedError,
)
from fedprompt.common.secagg.messages import (
    EncryptedShare,
    KeyAdvertisement,
    MaskedInput,
    Roster,
    ShareDelivery,
    ShareUpload,
    UnmaskRequest,
    UnmaskResponse,
)
from fedprompt.common.secagg.quantize import Quantizer
from fedprompt.common.secagg.randomness import RandomBytes
from fedprompt.common.secagg.server import AggregateResult, SecAggServer

__all__ = [
    "AggregateResult",
    "EncryptedShare",
    "KeyAdvertisement",
    "MaskedInput",
    "MessageFormatError",
    "ProtocolError",
    "Quantizer",
    "RandomBytes",
    "Roster",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "ShareDecryptionError",
    "ShareDelivery",
    "ShareUpload",
    "TooManyDropoutsError",
    "UnmaskRefusedError",
    "UnmaskRequest",
    "UnmaskResponse",
]
