"""open_clip and onnxruntime's quantiser log advice on the root logger ('initialized randomly',
'consider pre-processing'); during export they are not news and would break the progress bar."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def quiet_root_logger() -> Iterator[None]:
    """Raise the root logger to ERROR for the duration of the block."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)
