"""A small tree with every kind of entry a restore must get right: used by the demo and the round-trip tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def make_tricky_tree(root: Path, *, big_sparse_gib: int = 0, other_owner: bool = True) -> list[str]:
    """Create regular, empty, sparse, hard-linked, symlinked, oddly named and special entries under `root`.

    Returns notes on entries that could not be made here (e.g. no xattr support).
    """
    notes: list[str] = []
    r = os.fsencode(root)
    os.makedirs(r, exist_ok=True)
    j = os.path.join

    def write(rel: bytes, data: bytes, mode: int = 0o644) -> bytes:
        p = j(r, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)
        os.chmod(p, mode)
        return p

    write(b"docs/readme.txt", b"clawback sample tree\n" * 200)
    write(b"docs/empty.txt", b"")
    write(b"bin/tool.sh", b"#!/bin/sh\necho hi\n", 0o755)
    write(b"secret/key.pem", b"not really a key\n", 0o600)
    write(b"random.bin", os.urandom(3 * 1024 * 1024 + 17))
    # Unusual names: spaces, a newline, non-UTF-8 bytes, a leading dash.
    write(b"names/with space.txt", b"space\n")
    write(b"names/new\nline.txt", b"newline\n")
    write(b"names/latin1-\xe9\xff.txt", b"bytes\n")
    write(b"names/-dash", b"dash\n")
    os.makedirs(j(r, b"empty-dir/nested-empty"), exist_ok=True)
    # Modes with setuid, setgid and sticky bits.
    write(b"modes/setuid", b"x", 0o4755)
    os.makedirs(j(r, b"modes/sticky"), exist_ok=True)
    os.chmod(j(r, b"modes/sticky"), 0o1777)
    os.makedirs(j(r, b"modes/setgid-dir"), exist_ok=True)
    os.chmod(j(r, b"modes/setgid-dir"), 0o2750)
    # Hard links: three names for one inode.
    first = write(b"links/original", b"linked content\n" * 100)
    os.link(first, j(r, b"links/hardlink-1"))
    os.link(first, j(r, b"links/hardlink-2"))
    # Symlinks: relative, absolute, dangling, to a directory.
    os.symlink(b"../docs/readme.txt", j(r, b"links/rel-symlink"))
    os.symlink(b"/etc/hostname", j(r, b"links/abs-symlink"))
    os.symlink(b"does/not/exist", j(r, b"links/dangling"))
    os.symlink(b"../docs", j(r, b"links/dir-symlink"))
    # A sparse file: holes around a little data.
    sp = j(r, b"sparse.img")
    with open(sp, "wb") as f:
        f.truncate(64 * 1024 * 1024)
        f.seek(10 * 1024 * 1024)
        f.write(b"data in the middle" * 100)
    if big_sparse_gib:
        with open(j(r, b"big-sparse.img"), "wb") as f:
            f.truncate(big_sparse_gib * 1024**3)
            for off in (0, 1024**3 + 12345, big_sparse_gib * 1024**3 - 4096):
                f.seek(off)
                f.write(os.urandom(4096))
    # Extended attributes.
    try:
        os.setxattr(j(r, b"docs/readme.txt"), b"user.origin", b"clawback-demo")
        os.setxattr(j(r, b"docs"), b"user.dir-note", b"\x00\x01binary")
    except OSError as exc:
        notes.append(f"xattrs not supported here: {exc.strerror}")
    # Owners other than root, and precise mtimes.
    if other_owner and os.geteuid() == 0:
        os.chown(j(r, b"docs/readme.txt"), 1234, 5678)
        os.lchown(j(r, b"links/dangling"), 4321, 8765)
        os.chown(j(r, b"empty-dir"), 1000, 1000)
    os.utime(j(r, b"docs/empty.txt"), ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    # Special files: recorded, never read.
    os.mkfifo(j(r, b"special-fifo"))
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(os.fsdecode(j(r, b"special.sock")))
        s.close()
    except OSError as exc:
        notes.append(f"no unix socket: {exc.strerror}")
    os.utime(j(r, b"docs"), ns=(1_650_000_000_000_000_001, 1_650_000_000_000_000_002))
    return notes
