"""The development key file: creation, permissions, refusal to overwrite, malformed files."""

from __future__ import annotations

import os
import stat

import pytest

from core.chunkid import IdHasher, key_check
from core.errors import KeyMaterialError
from core.keys import FileKeyProvider, create_key_file


def test_create_and_load(tmp_path) -> None:
    p = tmp_path / "k" / "repo.key"
    check = create_key_file(p, repo_id="ab" * 16)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    kp = FileKeyProvider(p)
    assert key_check(kp.id_key()) == check == kp.key_check()
    dk = kp.new_data_key()
    assert len(dk.key) == 32 and len(dk.key_id) == 16 and dk.wrapped == b""
    assert kp.unwrap(dk.key_id, b"") == dk.key
    assert dk.key.hex() not in repr(dk)
    with pytest.raises(KeyMaterialError, match="not the key"):
        kp.unwrap(b"\0" * 16, b"")


def test_refuses_to_overwrite(tmp_path) -> None:
    p = tmp_path / "repo.key"
    create_key_file(p)
    before = p.read_bytes()
    with pytest.raises(KeyMaterialError, match="already exists"):
        create_key_file(p)
    assert p.read_bytes() == before


def test_group_readable_key_file_is_refused(tmp_path) -> None:
    p = tmp_path / "repo.key"
    create_key_file(p)
    os.chmod(p, 0o640)
    with pytest.raises(KeyMaterialError, match="chmod 600"):
        FileKeyProvider(p)


@pytest.mark.parametrize(
    "body", [b"", b"{", b'{"version": 2}', b'{"version": 1, "id_key": "!!", "data_key": "AA=="}']
)
def test_malformed_key_files(tmp_path, body: bytes) -> None:
    p = tmp_path / "repo.key"
    p.write_bytes(body)
    os.chmod(p, 0o600)
    with pytest.raises(KeyMaterialError, match="malformed"):
        FileKeyProvider(p)


def test_missing_key_file(tmp_path) -> None:
    with pytest.raises(KeyMaterialError, match="does not exist"):
        FileKeyProvider(tmp_path / "nope.key")


def test_ids_are_keyed() -> None:
    a, b = IdHasher(os.urandom(32)), IdHasher(os.urandom(32))
    assert a.blob_id(b"x") != b.blob_id(b"x")
    assert a.blob_id(b"x") == a.blob_id(memoryview(b"x"))
