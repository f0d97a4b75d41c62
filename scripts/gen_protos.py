"""Regenerate the committed gRPC stubs from proto/ (``hatch run protos``).

``--check`` regenerates into a temporary directory and exits 1 when the committed stubs differ,
which is what the staleness test runs.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_ROOT = ROOT / "core" / "src" / "dpkit" / "core" / "api"
# proto file (relative to proto/) -> package directory under dpkit/core/api
PROTOS = {
    "deviceplugin/v1beta1/api.proto": "v1beta1",
    "podresources/v1/api.proto": "podresources_v1",
}


def generate(out_root: Path) -> None:
    include = Path(protoc.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as raw:
        for proto, package in PROTOS.items():
            plugin = Path(sys.executable).parent / "protoc-gen-mypy_grpc"  # from mypy-protobuf
            args = [
                "protoc",
                f"--plugin=protoc-gen-mypy_grpc={plugin}",
                f"-I{PROTO_ROOT}",
                f"-I{include}",
                f"--python_out={raw}",
                f"--pyi_out={raw}",
                f"--grpc_python_out={raw}",
                f"--mypy_grpc_out={raw}",
                str(PROTO_ROOT / proto),
            ]
            if protoc.main(args) != 0:
                raise SystemExit(f"protoc failed on {proto}")
            src = Path(raw) / Path(proto).parent
            dest = out_root / package
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "__init__.py").write_text('"""Generated from proto/' + proto + ' by scripts/gen_protos.py."""\n')
            dotted = ".".join(Path(proto).parent.parts)
            for name in ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py", "api_pb2_grpc.pyi"):
                text = (src / name).read_text()
                # protoc writes absolute imports named after the proto path; make them package-relative.
                text = re.sub(rf"^from {re.escape(dotted)} import api_pb2", "from . import api_pb2", text, flags=re.M)
                (dest / name).write_text(text)
    (out_root / "__init__.py").write_text('"""Generated kubelet API stubs (do not edit; run `hatch run protos`)."""\n')


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail when the committed stubs are stale")
    args = parser.parse_args()
    if not args.check:
        generate(OUT_ROOT)
        print(f"stubs written to {OUT_ROOT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp) / "api"
        generate(fresh)
        stale = []
        for path in sorted(fresh.rglob("*.py*")):
            committed = OUT_ROOT / path.relative_to(fresh)
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(committed.relative_to(ROOT)))
        if stale:
            print("stale generated stubs (run `./hatchw run protos`):\n  " + "\n  ".join(stale))
            return 1
    print("generated stubs are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
