"""The committed generated code must equal a fresh generation from protos/ (run `make protos`)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEN = ROOT / "protos" / "clawback" / "v1"


def test_committed_stubs_match_a_fresh_generation(tmp_path: Path) -> None:
    bindir = Path(sys.executable).parent
    protos = sorted(str(p.relative_to(ROOT)) for p in GEN.glob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            ".",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
            f"--mypy_out={tmp_path}",
            f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
            f"--mypy_grpc_out={tmp_path}",
            *protos,
        ],
        cwd=ROOT,
        check=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "protos" / "clawback" / "v1").iterdir()}
    committed = {
        p.name: p.read_bytes()
        for p in GEN.iterdir()
        if p.name.endswith((".py", ".pyi")) and "_pb2" in p.name
    }
    assert sorted(fresh) == sorted(committed), "generated file set differs: run `make protos`"
    stale = [name for name in fresh if fresh[name] != committed[name]]
    assert not stale, f"stale generated code {stale}: run `make protos` and commit"
