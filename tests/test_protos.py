"""The committed generated code matches fedprompt.proto, and imports as part of the package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_the_proto() -> None:
    result = subprocess.run(
        [sys.executable, "protos/generate.py", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=99,
    )
    assert result.returncode == 0, result.stderr


def test_generated_grpc_code_imports_the_messages_package_relative() -> None:
    source = (ROOT / "protos" / "fedprompt_pb2_grpc.py").read_text()
    assert "from protos import fedprompt_pb2" in source
    from protos import fedprompt_pb2_grpc

    assert hasattr(fedprompt_pb2_grpc, "AggregatorStub")
