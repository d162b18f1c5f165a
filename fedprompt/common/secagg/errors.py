"""The ways secure aggregation can refuse to go on, so a transport can map each to a clear status."""

from __future__ import annotations


class SecAggError(ValueError):
    """Base of every secure-aggregation failure; the message is one readable sentence."""


class MessageFormatError(SecAggError):
    """Bytes that are not a well-formed message of the expected kind (truncated, garbage, trailing data)."""


class ProtocolError(SecAggError):
    """A well-formed message that does not fit the protocol state: wrong stage, unknown or duplicate
    sender, wrong recipients, wrong vector length, inconsistent shares."""


class ShareDecryptionError(SecAggError):
    """An encrypted share failed authentication: it was tampered with, replayed from another session,
    or addressed to someone else."""


class RefusedError(SecAggError):
    """A client refuses the session: a request that breaks one of its own checks (threshold below
    its floor, a survivor list it cannot accept, a peer whose keys are not authenticated). It
    reveals nothing more and never answers that session again."""


class UnmaskRefusedError(RefusedError):
    """A client refuses an unmasking request that would let the server learn an individual input,
    e.g. both the self-mask seed share and the mask-key share of the same peer, or a survivor list
    padded with strangers or not signed alike by enough survivors."""


class TooManyDropoutsError(SecAggError):
    """Fewer than `threshold` shares are left for a secret the sum needs, so it cannot be recovered."""
