"""Imports every server half so that each registers itself in `SERVER_STRATEGIES`."""

from __future__ import annotations

from aggregator.strategies import SERVER_STRATEGIES
from aggregator.strategies import afspl as _afspl  # noqa: F401
from aggregator.strategies import dpfpl as _dpfpl  # noqa: F401
from aggregator.strategies import fedmvp as _fedmvp  # noqa: F401
from aggregator.strategies import pfedmoap as _pfedmoap  # noqa: F401
from aggregator.strategies import promptfl as _promptfl  # noqa: F401
from aggregator.strategies import secfpp as _secfpp  # noqa: F401

__all__ = ["SERVER_STRATEGIES"]
