"""Regenerates the committed Python code for protos/fedprompt.proto with grpc_tools.

The generated files are committed so that installing fedprompt needs no code generator;
`--check` regenerates into a temporary folder and fails when the committed files differ, so the
code can never silently drift from the .proto. Generation runs from the repository root, which
makes the generated imports package-relative (`from protos import fedprompt_pb2`).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO = "protos/fedprompt.proto"
GENERATED = ("fedprompt_pb2.py", "fedprompt_pb2_grpc.py")


def generate_into(out_dir: Path) -> None:
    """Runs protoc (from grpc_tools) on the .proto, writing protos/<generated> under out_dir."""
    from grpc_tools import protoc

    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed code differs")
    check = parser.parse_args().check
    with tempfile.TemporaryDirectory() as tmp:
        generate_into(Path(tmp))
        fresh = Path(tmp) / "protos"
        if check:
            stale = [
                name
                for name in GENERATED
                if not (ROOT / "protos" / name).exists()
                or not filecmp.cmp(fresh / name, ROOT / "protos" / name, shallow=False)
            ]
            if stale:
                from grpc_tools import grpc_version

                print(
                    f"protos: {', '.join(stale)} differ from {PROTO} (grpcio-tools "
                    f"{grpc_version.VERSION}); run `python protos/generate.py`",
                    file=sys.stderr,
                )
                return 1
            print(f"protos: generated code matches {PROTO}")
            return 0
        for name in GENERATED:
            shutil.copyfile(fresh / name, ROOT / "protos" / name)
        print(f"protos: wrote {', '.join(GENERATED)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
