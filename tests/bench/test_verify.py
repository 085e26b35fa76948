"""bench.verify.compare_trees finds every kind of difference and none in a faithful copy."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.verify import BLOCK, compare_trees, summarize

NON_UTF8 = os.fsdecode(b"caf\xe9.txt")


def _xattrs_supported(path: Path) -> bool:
    probe = path / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
    except OSError:
        return False
    finally:
        probe.unlink()
    return True


@pytest.fixture
def trees(tmp_path: Path) -> tuple[Path, Path]:
    """A small tree `a` with every kind of entry, and its `cp -a` copy `b`."""
    a = tmp_path / "a"
    (a / "sub" / "deep").mkdir(parents=True)
    (a / "empty").mkdir()
    (a / "file.txt").write_bytes(b"hello world\n" * 100)
    (a / "sub" / "big.bin").write_bytes(os.urandom(3 * BLOCK + 123))
    (a / "sub" / "deep" / "empty-file").write_bytes(b"")
    (a / NON_UTF8).write_bytes(b"latin-1 name")
    os.link(a / "file.txt", a / "sub" / "hardlink.txt")
    os.symlink("../file.txt", a / "sub" / "link")
    os.symlink("/nonexistent/target", a / "dangling")
    os.chmod(a / "sub" / "big.bin", 0o600)
    if _xattrs_supported(tmp_path):
        os.setxattr(a / "file.txt", "user.color", b"blue")
    for p in (a / "file.txt", a / "sub" / "big.bin", a / "sub", a):
        os.utime(p, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    b = tmp_path / "b"
    subprocess.run(["cp", "-a", str(a), str(b)], check=True)
    return a, b


def test_cp_a_copy_is_identical(trees: tuple[Path, Path]) -> None:
    a, b = trees
    assert compare_trees(a, b) == []
    assert compare_trees(str(a), os.fsencode(b)) == []


def _keep_mtime(path: Path, change: Callable[[], None]) -> None:
    st = os.lstat(path)
    change()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(1)
        f.seek(offset)
        f.write(bytes([old[0] ^ 0xFF]))


def _append(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"x")


def _break_hardlink(b: Path) -> None:
    """Replace the second name of a hard-linked file by an independent copy (same bytes and metadata)."""
    p = b / "sub" / "hardlink.txt"
    p.unlink()
    subprocess.run(["cp", "-a", str(b / "file.txt"), str(p)], check=True)
    mtime = (b.parent / "a" / "sub").stat().st_mtime_ns
    os.utime(p.parent, ns=(mtime, mtime))


def _retarget(b: Path) -> None:
    link = b / "sub" / "link"
    link.unlink()
    os.symlink("../other.txt", link)
    mtime = (b.parent / "a" / "sub").stat().st_mtime_ns
    os.utime(link.parent, ns=(mtime, mtime))


CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "one byte": (
        lambda b: _keep_mtime(b / "file.txt", lambda: _flip_byte(b / "file.txt", 7)),
        "file.txt: content differs at byte 7",
    ),
    "byte in a later block": (
        lambda b: _keep_mtime(
            b / "sub/big.bin", lambda: _flip_byte(b / "sub/big.bin", 2 * BLOCK + 5)
        ),
        f"sub/big.bin: content differs at byte {2 * BLOCK + 5}",
    ),
    "size": (
        lambda b: _keep_mtime(b / "sub/big.bin", lambda: _append(b / "sub/big.bin")),
        "sub/big.bin: size a=",
    ),
    "mode": (lambda b: os.chmod(b / "file.txt", 0o640), "file.txt: mode a=0o644 b=0o640"),
    "mtime": (
        lambda b: os.utime(b / "sub/big.bin", ns=(0, 1)),
        "sub/big.bin: mtime_ns a=1600000000123456789 b=1",
    ),
    "dir mtime": (lambda b: os.utime(b / "sub", ns=(0, 1)), "sub: mtime_ns"),
    "missing": (
        lambda b: _keep_mtime(b / "sub/deep", lambda: (b / "sub/deep/empty-file").unlink()),
        "sub/deep/empty-file: only in a",
    ),
    "extra": (
        lambda b: _keep_mtime(b / "empty", lambda: (b / "empty/new").write_bytes(b"")),
        "empty/new: only in b",
    ),
    "missing dir reported once": (
        lambda b: _keep_mtime(b / "sub", lambda: __import__("shutil").rmtree(b / "sub/deep")),
        "sub/deep: only in a",
    ),
    "symlink target": (_retarget, "sub/link: symlink target a=b'../file.txt' b=b'../other.txt'"),
    "hard link broken": (
        _break_hardlink,
        "file.txt: hard links a=[file.txt, sub/hardlink.txt] b=[file.txt]",
    ),
    "type": (
        lambda b: _keep_mtime(b, lambda: ((b / "dangling").unlink(), (b / "dangling").mkdir())),
        "dangling: type a=symlink b=directory",
    ),
    "non-utf8 name": (
        lambda b: _keep_mtime(b / NON_UTF8, lambda: _flip_byte(b / NON_UTF8, 0)),
        "caf\\xe9.txt: content differs at byte 0",
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_detects(trees: tuple[Path, Path], case: str) -> None:
    a, b = trees
    change, expected = CASES[case]
    change(b)
    diffs = compare_trees(a, b)
    assert len(diffs) == 1, summarize(diffs)
    assert diffs[0].startswith(expected), diffs


def test_detects_xattr_change(trees: tuple[Path, Path]) -> None:
    a, b = trees
    if not os.listxattr(a / "file.txt"):
        pytest.skip("no user xattrs on this filesystem")
    os.setxattr(b / "file.txt", "user.color", b"red")
    assert compare_trees(a, b) == ["file.txt: xattr user.color a=b'blue' b=b'red'"]
    os.removexattr(b / "file.txt", "user.color")
    assert compare_trees(a, b) == ["file.txt: xattr user.color only in a"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_owner_and_flags(trees: tuple[Path, Path]) -> None:
    a, b = trees
    os.chown(b / "file.txt", 1234, 5678)
    os.utime(b / "sub", ns=(0, 1))
    assert compare_trees(a, b) == [
        "file.txt: owner a=0:0 b=1234:5678",
        "sub: mtime_ns a=1600000000123456789 b=1",
    ]
    assert compare_trees(a, b, check_owner=False, check_times=False) == []


def test_missing_root_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        compare_trees(tmp_path, tmp_path / "nope")


def test_summarize() -> None:
    assert summarize([]) == "identical"
    text = summarize([f"d{i}" for i in range(30)], limit=3)
    assert text.startswith("30 difference(s):") and "and 27 more" in text
