"""What a method keeps on the device between rounds (DP-FPL's local prompt, pFedMoAP's gating
network): named float tensors, one file per method and run.

Files are written atomically, so a crash leaves the old or the new state whole, and read back
through the strict wire codec, so a damaged file is one clear error rather than a silent restart
from scratch.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edge_client.workspace import WorkspaceError
from fedprompt.common.codec import CodecError, decode_tensor_set, encode_tensor_set
from fedprompt.common.files import write_atomically

METHOD_STATE_DIR = "method_state"


def state_file(state_dir: Path, method: str, run_id: str) -> Path:
    """Where a method's local parts of one run live. A new run starts them afresh; the run id comes
    from the server, so it is hashed and can never name a path outside the state folder."""
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:16]
    return Path(state_dir) / METHOD_STATE_DIR / f"{method}-{digest}.tensors"


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    write_atomically(path, encode_tensor_set(tensors, "fp32"))


def load_tensors(path: Path) -> dict[str, np.ndarray]:
    """The saved tensors, or {} when nothing was saved yet."""
    if not path.exists():
        return {}
    try:
        return decode_tensor_set(path.read_bytes())
    except CodecError as error:
        raise WorkspaceError(
            f"{path} is not readable local method state ({error}); remove it knowingly"
        ) from None
