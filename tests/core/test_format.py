"""The repository config: what it stores, what older configs mean, what it refuses."""

from __future__ import annotations

import json

import pytest

from core.errors import IntegrityError
from core.format import RepoConfig


def test_config_round_trips_its_paged_files() -> None:
    cfg = RepoConfig(
        repo_id="ab" * 16,
        paged_chunker="fixed-64k",
        paged_files=("*.db", "x/*"),
        paged_formats=("sqlite3",),
    )
    back = RepoConfig.from_json(cfg.to_json())
    assert back == cfg and back.paged_files == ("*.db", "x/*")
    assert back.paged_formats == ("sqlite3",)


def test_config_written_before_paged_files_has_none() -> None:
    """Repositories initialised before the policy existed keep cutting every file alike."""
    old = json.loads(RepoConfig(repo_id="ab" * 16).to_json())
    del old["paged_chunker"], old["paged_files"], old["paged_formats"]
    cfg = RepoConfig.from_json(json.dumps(old).encode())
    assert cfg.paged_chunker == "" and cfg.paged_files == () and cfg.paged_formats == ()


def test_config_written_before_paged_formats_recognises_none() -> None:
    raw = json.loads(RepoConfig(repo_id="ab" * 16, paged_chunker="fixed-64k").to_json())
    del raw["paged_formats"]
    assert RepoConfig.from_json(json.dumps(raw).encode()).paged_formats == ()


@pytest.mark.parametrize("paged_formats", ["sqlite3", ["sqlite3", 3], {"sqlite3": 1}])
def test_malformed_paged_formats_make_the_config_unreadable(paged_formats: object) -> None:
    raw = json.loads(RepoConfig(repo_id="ab" * 16).to_json())
    raw["paged_formats"] = paged_formats
    with pytest.raises(IntegrityError, match="unreadable: paged_formats must be a list of names"):
        RepoConfig.from_json(json.dumps(raw).encode())


@pytest.mark.parametrize(
    ("paged_files", "says"),
    [
        ("*.db", "must be a list"),
        (["*.db", ""], "is empty"),
        (["*.db", 3], "not text"),
        (["a\0b"], "no NUL"),
        (["*"] * 65, "at most 64"),
    ],
)
def test_malformed_paged_files_make_the_config_unreadable(paged_files: object, says: str) -> None:
    raw = json.loads(RepoConfig(repo_id="ab" * 16).to_json())
    raw["paged_files"] = paged_files
    with pytest.raises(IntegrityError, match=f"repository config is unreadable: .*{says}"):
        RepoConfig.from_json(json.dumps(raw).encode())
