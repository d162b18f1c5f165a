"""The device's long-term identity for secure aggregation, and the peers' identities it has met.

`device_identity` creates the Ed25519 key once per state folder (kept there, mode 0600); its
public half is registered at enrolment, which binds the enrolment token to it. `PeerPins`
remembers each peer's identity key under the peer's client id the first time this device meets
it (trust on first use), so an aggregator that later swaps a known peer's keys is caught.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from fedprompt.common.files import write_atomically
from fedprompt.common.secagg.identity import DeviceIdentity

log = logging.getLogger("fedprompt.client")
IDENTITY_FILE = "device-identity.key"
PINS_FILE = "peer-identities.json"


def device_identity(state_dir: Path) -> DeviceIdentity:
    """This device's identity, created on first use."""
    path = Path(state_dir) / IDENTITY_FILE
    try:
        return DeviceIdentity.from_bytes(path.read_bytes())
    except FileNotFoundError:
        identity = DeviceIdentity.generate()
        write_atomically(path, identity.private_bytes())
        return identity


class PeerPins:
    """client id -> identity key, as first met; a different key later is refused. Kept in the
    state folder, or only in memory without one (the in-process harness)."""

    def __init__(self, state_dir: Path | None) -> None:
        self.path = None if state_dir is None else Path(state_dir) / PINS_FILE
        self._pins: dict[str, str] = {}
        if self.path is not None and self.path.exists():
            self._pins = json.loads(self.path.read_text())

    def trust(self, name: str, identity_key: bytes) -> bool:
        pinned = self._pins.get(name)
        if pinned is None:
            self._pins[name] = identity_key.hex()
            if self.path is not None:
                write_atomically(self.path, json.dumps(self._pins, sort_keys=True).encode())
            return True
        if pinned != identity_key.hex():
            log.warning("secure aggregation: peer %s shows an identity key other than the one pinned", name)
            return False
        return True
