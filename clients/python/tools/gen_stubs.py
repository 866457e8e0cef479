"""Generates the Python stubs of ghm.v1 from the repository's proto into src/ghmd/_proto.

    python clients/python/tools/gen_stubs.py

The stubs are committed so that installing ghmd-client needs no protoc; tests/test_stubs.py
regenerates them into a temporary directory with this same function and fails on any
difference, so the committed copy cannot drift from proto/ghm/v1/ghm.proto.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

CLIENT_ROOT = Path(__file__).resolve().parent.parent
REPO_ROOT = CLIENT_ROOT.parent.parent
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = "ghm/v1/ghm.proto"
STUB_DIR = CLIENT_ROOT / "src" / "ghmd" / "_proto"
# The files protoc writes for PROTO_FILE, all of them committed.
GENERATED = ("ghm_pb2.py", "ghm_pb2.pyi", "ghm_pb2_grpc.py")

# protoc's gRPC plugin imports the messages by their proto path, as a top-level package `ghm.v1`;
# inside ghmd they are a sibling module instead.
_ABSOLUTE_IMPORT = "from ghm.v1 import ghm_pb2 as ghm_dot_v1_dot_ghm__pb2"
_RELATIVE_IMPORT = "from . import ghm_pb2 as ghm_dot_v1_dot_ghm__pb2"


def generate(out_dir: Path) -> None:
    """Writes GENERATED for the current proto into out_dir."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        status = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{PROTO_ROOT}",
                f"-I{well_known}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                PROTO_FILE,
            ]
        )
        if status != 0:
            raise RuntimeError(f"protoc failed on {PROTO_ROOT / PROTO_FILE} with status {status}")
        produced = Path(raw) / os.path.dirname(PROTO_FILE)
        out_dir.mkdir(parents=True, exist_ok=True)
        for name in GENERATED:
            text = (produced / name).read_text()
            if name == "ghm_pb2_grpc.py":
                if _ABSOLUTE_IMPORT not in text:
                    raise RuntimeError(f"{name}: protoc no longer writes {_ABSOLUTE_IMPORT!r}")
                text = text.replace(_ABSOLUTE_IMPORT, _RELATIVE_IMPORT)
            (out_dir / name).write_text(text)


if __name__ == "__main__":
    generate(STUB_DIR)
    print(f"wrote {', '.join(GENERATED)} to {STUB_DIR}", file=sys.stderr)
