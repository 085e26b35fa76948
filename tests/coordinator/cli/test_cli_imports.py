"""What the `clawback` CLI imports at start: every run pays for it, so heavy modules load only where used."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from coordinator.cli import certs, cmd_certs
from coordinator.cli.certs import create_dev_pki

ROOT = Path(__file__).resolve().parents[3]

# Needed only by `certs init`, by Vault (hvac) or to parse a certificate (cryptography).
HEAVY = ("cryptography", "hvac", "coordinator.cli.certs", "coordinator.cli.vaultsetup")


def _modules_after(code: str) -> set[str]:
    """The top-level and project module names a fresh interpreter holds after running `code`."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(json.loads(out.stdout.splitlines()[-1]))


def _loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


def test_starting_the_cli_imports_no_heavy_module() -> None:
    modules = _modules_after("import coordinator.cli.main")
    assert _loaded(modules, HEAVY) == []
    # The gRPC client is imported by the commands that dial the coordinator, not by `--help`.
    assert _loaded(modules, ("grpc", "coordinator.cli.client")) == []


def test_dialing_with_certificate_files_parses_no_certificate(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path, admins=["ops"])
    admin = pki["admins"]["ops"]
    code = (
        "from pathlib import Path\n"
        "from coordinator.cli.main import main\n"
        "from coordinator.cli.client import AdminClient\n"
        "from core.tls import TlsFiles\n"
        f"files = TlsFiles(Path({str(pki['ca'])!r}), Path({str(admin.cert)!r}), Path({str(admin.key)!r}))\n"
        "AdminClient('127.0.0.1:1', files).close()\n"
    )
    modules = _modules_after(code)
    assert "grpc" in modules
    assert _loaded(modules, HEAVY) == []


def test_certs_init_default_days_matches_the_library() -> None:
    # cmd_certs keeps its own copy so that declaring the flag does not import cryptography.
    assert cmd_certs.DEFAULT_DAYS == certs.DEFAULT_DAYS
