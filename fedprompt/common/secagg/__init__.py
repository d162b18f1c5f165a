"""Secure aggregation (SecAgg / SecAgg+) for methods whose server half only needs sums.

Transport-independent: both the edge client and the aggregator drive it by exchanging the byte
messages of `messages`, in the order shown by `loopback.run_loopback`. The server learns the sum of
the surviving clients' quantised inputs and which clients survived, nothing else, even when it
deviates from the protocol, unless it controls threshold - 1 clients (see `client` and `policy`).
"""

from fedprompt.common.secagg.client import SecAggClient
from fedprompt.common.secagg.config import SecAggConfig
from fedprompt.common.secagg.errors import (
    MessageFormatError,
    ProtocolError,
    RefusedError,
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
    SignedSurvivors,
    SurvivorSignature,
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
    "RefusedError",
    "Roster",
    "SecAggClient",
    "SecAggConfig",
    "SecAggError",
    "SecAggServer",
    "ShareDecryptionError",
    "ShareDelivery",
    "ShareUpload",
    "SignedSurvivors",
    "SurvivorSignature",
    "TooManyDropoutsError",
    "UnmaskRefusedError",
    "UnmaskRequest",
    "UnmaskResponse",
]
