"""Architecture contracts (pyproject [tool.importlinter]): agent and coordinator stay independent, core knows
neither, and the coordinator server never imports decryption or the id key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold() -> None:
    exe = Path(sys.executable).parent / "lint-imports"
    r = subprocess.run([str(exe), "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0 broken" in r.stdout, r.stdout
