"""`clawback vault setup` against a real OpenBao: idempotent, reports what it did, never overwrites the id key."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest

from coordinator.cli.main import main
from coordinator.cli.vaultsetup import render_policy, setup_vault
from core.errors import UsageError
from core.vault import VaultClient, VaultSettings
from core.vaultkeys import VaultKeyProvider
from deploy.vaultdev import DevVault, VaultDevServer


def _id_key(vault: DevVault) -> str:
    resp = vault.operator.secrets.kv.v2.read_secret_version(
        "id-key", mount_point="clawback-kv", raise_on_deleted_version=True
    )
    return str(resp["data"]["data"]["key"])


def test_setup_twice_is_idempotent_and_keeps_the_id_key(vault: DevVault) -> None:
    first = vault.setup
    assert {i.status for i in first.items if i.kind != "file"} == {"created"}
    assert set(first.files) == {"agent-node1", "agent-node2", "coordinator", "restore"}
    for f in first.files.values():
        for p in (f.role_id_file, f.secret_id_file):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(f.role_id_file.parent.stat().st_mode) == 0o700
    before = _id_key(vault)
    role_id = first.files["restore"].role_id_file.read_text()

    second = setup_vault(vault.operator_client, vault.settings, ["node1", "node2"], vault.out)
    not_present = [i for i in second.items if i.kind != "file" and i.status != "present"]
    assert not_present == []
    assert second.status("kv-secret", "clawback-kv/id-key") == "present"
    assert _id_key(vault) == before
    versions = vault.operator.secrets.kv.v2.read_secret_metadata(
        "id-key", mount_point="clawback-kv"
    )
    assert versions["data"]["current_version"] == 1
    assert first.files["restore"].role_id_file.read_text() == role_id
    assert second.status("file", str(first.files["restore"].role_id_file)) == "present"
    assert second.status("file", str(first.files["restore"].secret_id_file)) == "issued"
    # The new secret_id files work (once).
    c = vault.track(
        VaultClient(
            dataclasses.replace(
                vault.settings,
                role_id_file=second.files["restore"].role_id_file,
                secret_id_file=second.files["restore"].secret_id_file,
            ),
            renew=False,
        )
    )
    c.login()


def test_drift_is_repaired_and_reported_as_updated(vault: DevVault) -> None:
    vault.operator.sys.create_or_update_policy(
        "clawback-agent", 'path "sys/*" { capabilities = ["sudo"] }'
    )
    vault.operator.write("clawback-pki/roles/agent", ou="someone-else", allow_any_name=True)
    result = setup_vault(vault.operator_client, vault.settings, ["node1", "node2"])
    assert result.status("policy", "clawback-agent") == "updated"
    assert result.status("pki-role", "agent") == "updated"
    assert 'path "sys/*"' not in vault.operator.sys.read_policy("clawback-agent")["data"]["rules"]
    assert vault.operator.read("clawback-pki/roles/agent")["data"]["ou"] == ["agent"]


def test_an_existing_id_key_is_never_overwritten(tmp_path: Path) -> None:
    with VaultDevServer(tmp_path / "bao") as server:
        op = VaultClient.for_token(VaultSettings(address=server.address), server.root_token)
        op.request("POST", "sys/mounts/clawback-kv", {"type": "kv", "options": {"version": "2"}})
        op.request("POST", "clawback-kv/data/id-key", {"data": {"key": "AAAA" * 11 + "AA=="}})
        result = setup_vault(op, op.settings, ["node1"])
        assert result.status("mount", "clawback-kv") == "present"
        assert result.status("kv-secret", "clawback-kv/id-key") == "present"
        assert op.read_kv("clawback-kv", "id-key") == {"key": "AAAA" * 11 + "AA=="}
        op.close()


def test_conflicting_mount_is_a_clear_error(tmp_path: Path) -> None:
    with VaultDevServer(tmp_path / "bao") as server:
        op = VaultClient.for_token(VaultSettings(address=server.address), server.root_token)
        op.request("POST", "sys/mounts/clawback-kv", {"type": "kv", "options": {"version": "1"}})
        with pytest.raises(UsageError, match="version 1; clawback needs KV v2"):
            setup_vault(op, op.settings, [])
        op.close()


def test_configured_names_are_used_everywhere(tmp_path: Path) -> None:
    names = {
        "transit_mount": "bk-transit",
        "transit_key": "bk-key",
        "kv_mount": "bk-kv",
        "id_key_path": "team/id",
        "pki_mount": "bk-pki",
        "approle_mount": "bk-approle",
        "grant_role": "bk-grant",
    }
    with VaultDevServer(tmp_path / "bao") as server:
        s = VaultSettings(address=server.address, **names)  # type: ignore[arg-type]
        op = VaultClient.for_token(s, server.root_token)
        result = setup_vault(op, s, ["n1"], tmp_path / "out")
        rendered = render_policy(Path("deploy/vault/policies/agent.hcl").read_text(), s)
        assert 'path "bk-transit/datakey/plaintext/bk-key"' in rendered
        assert 'path "bk-kv/data/team/id"' in rendered
        f = result.files["agent-n1"]
        agent = VaultClient(
            dataclasses.replace(s, role_id_file=f.role_id_file, secret_id_file=f.secret_id_file),
            renew=False,
        )
        kp = VaultKeyProvider(agent)
        dk = kp.new_data_key()
        assert len(kp.id_key()) == 32
        grant = agent.unwrap_grant(op.mint_restore_grant(uses=1))
        assert kp.for_grant(grant).unwrap(dk.key_id, dk.wrapped) == dk.key
        agent.close()
        op.close()


def test_cli_vault_setup(
    vault: DevVault,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "creds"
    argv = [
        "vault",
        "setup",
        "--vault-addr",
        vault.server.address,
        "--agent",
        "node1",
        "--agent",
        "node3",
        "--out",
        str(out),
    ]
    monkeypatch.delenv("VAULT_TOKEN", raising=False)
    monkeypatch.delenv("BAO_TOKEN", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert main(argv) == 2
    assert "no Vault token: set VAULT_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("VAULT_TOKEN", vault.server.root_token)
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    statuses = {(i["kind"], i["name"]): i["status"] for i in record["items"]}
    assert statuses[("approle", "clawback-agent-node3")] == "created"
    assert statuses[("approle", "clawback-agent-node1")] == "present"
    assert statuses[("kv-secret", "clawback-kv/id-key")] == "present"
    assert set(record["roles"]) == {"agent-node1", "agent-node3", "coordinator", "restore"}
    assert Path(record["roles"]["agent-node3"]["secret_id_file"]).exists()
    assert vault.server.root_token not in json.dumps(record)

    monkeypatch.delenv("VAULT_TOKEN")
    (tmp_path / ".vault-token").write_text(vault.server.root_token + "\n")
    assert main(argv) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split() == ["KIND", "NAME", "STATUS"]
    assert any(line.split() == ["approle", "clawback-agent-node3", "present"] for line in lines)
    assert "already present" in captured.err
    assert vault.server.root_token not in captured.out + captured.err


def test_cli_vault_grant(
    vault: DevVault, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("VAULT_TOKEN", vault.server.root_token)
    argv = ["vault", "grant", "--vault-addr", vault.server.address, "--uses", "2", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["uses"] == 2
    agent = vault.client_for("agent-node1")
    grant = agent.unwrap_grant(record["grant"])
    assert vault.operator.lookup_token(grant)["data"]["num_uses"] == 2
