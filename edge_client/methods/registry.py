"""Imports every client half so that each registers itself in `CLIENT_METHODS`."""

from __future__ import annotations

from edge_client.methods import CLIENT_METHODS
from edge_client.methods import afspl as _afspl  # noqa: F401
from edge_client.methods import dpfpl as _dpfpl  # noqa: F401
from edge_client.methods import fedmvp as _fedmvp  # noqa: F401
from edge_client.methods import pfedmoap as _pfedmoap  # noqa: F401
from edge_client.methods import promptfl as _promptfl  # noqa: F401
from edge_client.methods import secfpp as _secfpp  # noqa: F401

__all__ = ["CLIENT_METHODS"]
