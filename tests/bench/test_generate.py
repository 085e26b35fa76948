"""bench.generate: the same seed gives the same tree, proportions are roughly right, mutate is realistic."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import zstandard

from bench.generate import (
    BIG_REL,
    DB_REL,
    LOG_DIR_REL,
    PAGE_SIZE,
    REF_BYTES,
    REF_FILES,
    generate,
    main,
    mutate,
    parse_size,
)
from bench.verify import compare_trees, summarize

SIZE = "5M"


def _files(root: Path) -> dict[str, bytes]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath, n)
            if stat.S_ISREG(p.lstat().st_mode):
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


def _ratio(data: bytes) -> float:
    return len(data) / len(zstandard.ZstdCompressor(level=3).compress(data))


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("vol") / "data"
    return root, generate(root, "20M", seed=7)


def test_parse_size() -> None:
    assert parse_size("200M") == 200 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5GiB") == 3 << 29
    assert parse_size("512k") == 512 << 10
    assert parse_size(1000) == 1000
    assert parse_size("quick") == 200 << 20
    for bad in ("", "2X", "-1M", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_same_seed_same_tree(tmp_path: Path) -> None:
    m1 = generate(tmp_path / "a", SIZE, seed=3)
    m2 = generate(tmp_path / "b", SIZE, seed=3)
    assert m1 == m2
    # bytes, names, modes, owners, mtimes, links, xattrs: all identical
    assert compare_trees(tmp_path / "a", tmp_path / "b") == []


def test_other_seed_other_tree(tmp_path: Path) -> None:
    generate(tmp_path / "a", SIZE, seed=3)
    generate(tmp_path / "b", SIZE, seed=4)
    fa, fb = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert fa[BIG_REL] != fb[BIG_REL]
    assert set(fa) != set(fb)


def test_mutate_is_deterministic(tmp_path: Path) -> None:
    generate(tmp_path / "a", SIZE, seed=3)
    generate(tmp_path / "b", SIZE, seed=3)
    s1 = mutate(tmp_path / "a", seed=9)
    s2 = mutate(tmp_path / "b", seed=9)
    assert s1 == s2
    assert compare_trees(tmp_path / "a", tmp_path / "b") == []


def test_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        generate(tmp_path, SIZE)


def test_proportions(volume: tuple[Path, object]) -> None:
    root, m = volume
    target = 20 << 20
    assert abs(m.total_bytes - target) / target < 0.1, m
    expected_files = REF_FILES * target / REF_BYTES
    assert 0.8 * expected_files < m.files < 1.25 * expected_files, m
    assert 0.35 < m.text_files / m.small_files < 0.65
    assert m.duplicate_files > 0 and m.symlinks >= 3 and m.hardlinks >= 2
    assert m.empty_files >= 3 and m.empty_dirs >= 3 and m.log_files >= 2

    files = _files(root)
    assert len(files) == m.files
    assert sum(len(v) for v in files.values()) >= m.total_bytes  # hard links read twice here

    db = files[DB_REL]
    assert len(db) == m.db_pages * PAGE_SIZE
    assert db[:4] == b"CBPG" and db[PAGE_SIZE : PAGE_SIZE + 4] == b"CBPG"
    assert 1.5 < _ratio(db) < 10  # mixed: rows compress, blob pages do not
    assert _ratio(files[BIG_REL]) < 1.01
    logs = [v for k, v in files.items() if k.startswith(LOG_DIR_REL)]
    assert all(_ratio(v) > 2 for v in logs)
    text = b"".join(v for k, v in files.items() if k.endswith((".json", ".txt", ".csv", ".md")))
    assert _ratio(text) > 2

    # duplicates are exact copies of another file
    by_content: dict[bytes, int] = {}
    for v in files.values():
        if v:
            by_content[v] = by_content.get(v, 0) + 1
    copies = sum(n - 1 for n in by_content.values())
    assert copies >= m.duplicate_files  # (hard links read as copies here)

    kinds = {stat.S_IFMT(os.lstat(p).st_mode) for p in root.rglob("*")}
    assert {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK} <= kinds
    assert any(not os.listdir(d) for d in root.rglob("*") if d.is_dir() and not d.is_symlink())
    assert b"caf\xe9.txt" in {os.fsencode(p.name) for p in root.rglob("*")}


def test_mutate_changes_what_it_says(tmp_path: Path) -> None:
    root = tmp_path / "v"
    m = generate(root, "20M", seed=5)
    before = _files(root)
    s = mutate(root, seed=6)
    after = _files(root)

    assert abs(s.rewritten_files - round(0.05 * m.small_files)) <= 0.2 * s.rewritten_files + 3
    assert s.deleted_files >= 1 and s.added_files >= 1
    assert len(set(before) - set(after)) == s.deleted_files
    assert len(set(after) - set(before)) == s.added_files
    changed = [k for k in set(before) & set(after) if before[k] != after[k]]
    # rewritten files + the database + the logs (a rewritten duplicate's hard link also changes)
    assert (
        s.rewritten_files + 1 + s.logs_appended
        <= len(changed)
        <= s.rewritten_files + 1 + s.logs_appended + 4
    )

    old_db, new_db = before[DB_REL], after[DB_REL]
    assert len(old_db) == len(new_db)
    pages = [
        i
        for i in range(0, len(old_db), PAGE_SIZE)
        if old_db[i : i + PAGE_SIZE] != new_db[i : i + PAGE_SIZE]
    ]
    assert len(pages) == s.db_pages_changed == round(m.db_pages * 0.01)
    assert before[BIG_REL] == after[BIG_REL]
    for k in before:
        if k.startswith(LOG_DIR_REL):
            assert after[k].startswith(before[k]) and len(after[k]) > len(before[k])
    # changed files get a newer mtime than anything generated
    newest_before = max(
        os.lstat(root / k).st_mtime_ns for k in set(before) & set(after) if before[k] == after[k]
    )
    assert os.lstat(root / DB_REL).st_mtime_ns > newest_before


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "v"), "--size", "2M", "--seed", "2"]) == 0
    assert '"seed": 2' in capsys.readouterr().out
    assert main([str(tmp_path / "v"), "--mutate", "3"]) == 0
    assert main([str(tmp_path / "v"), "--size", "2M"]) == 2  # not empty
    assert main([str(tmp_path / "v"), "--size", "2M", "--force"]) == 0
    assert summarize(compare_trees(tmp_path / "v", tmp_path / "v")) == "identical"
