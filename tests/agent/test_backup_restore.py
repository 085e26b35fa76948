"""Backup and restore pipelines end to end against the real coordinator BlobStore (LocalBackend + SqliteCatalog)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import socket
import stat
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.backup import BackupResult, run_backup
from agent.restore import RestoreResult, run_restore
from bench.verify import compare_trees
from core import format
from core.chunker import Chunker, params
from core.clock import ManualClock
from core.errors import KeyMaterialError, UsageError
from core.keys import FileKeyProvider, create_key_file
from protos.clawback.v1 import common_pb2
from tests.agent.conftest import Env, close_env, make_env

GiB = 1024**3
IS_ROOT = os.geteuid() == 0


async def backup(env: Env, src: Path, **kw: object) -> BackupResult:
    kw.setdefault("agent", "node-1")
    kw.setdefault("source", "vol")
    kw.setdefault("job_id", "job-b")
    kw.setdefault("cache_dir", env.cache_dir)
    return await run_backup(env.repo, env.keys, env.cfg, src, **kw)  # type: ignore[arg-type]


async def restore(
    env: Env, info: common_pb2.SnapshotInfo, dst: Path, **kw: object
) -> RestoreResult:
    kw.setdefault("job_id", "job-r")
    return await run_restore(env.repo, env.keys, env.cfg, info, dst, **kw)  # type: ignore[arg-type]


def walk(root: Path) -> dict[bytes, os.stat_result]:
    out = {}
    base = os.fsencode(root)
    for dirpath, dirnames, filenames in os.walk(base):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            out[os.path.relpath(p, base)] = os.lstat(p)
    return out


def assert_same_tree(src: Path, dst: Path, *, times: bool = True) -> None:
    """Byte-for-byte and metadata comparison, by the verifier the demo and the bench use."""
    assert compare_trees(src, dst, check_times=times) == []


def build_source(root: Path) -> Path:
    """Every kind of entry clawback must carry."""
    src = root / "src"
    src.mkdir()
    rnd = random.Random(7)
    (src / "small.txt").write_bytes(b"hello clawback\n")
    (src / "multi-chunk.bin").write_bytes(rnd.randbytes(9 * 1024 * 1024))
    (src / "empty").write_bytes(b"")
    (src / "name with spaces").write_bytes(b"s" * 100)
    (src / "new\nline").write_bytes(b"n" * 10)
    (src / os.fsdecode(b"latin1-\xe9\xff")).write_bytes(b"not utf-8 name")
    d = src / "sub" / "deeper"
    d.mkdir(parents=True)
    (d / "dup-of-small.txt").write_bytes(b"hello clawback\n")
    (src / "empty-dir").mkdir()
    (src / "sub" / "empty-dir-2").mkdir()
    # Hard links: three names, one inode.
    (src / "linked").write_bytes(b"L" * 5000)
    os.link(src / "linked", src / "sub" / "linked-2")
    os.link(src / "linked", d / "linked-3")
    # Symlinks: relative, absolute, dangling, to a directory.
    os.symlink("small.txt", src / "rel-link")
    os.symlink("/etc/passwd", src / "abs-link")
    os.symlink("does/not/exist", src / "dangling")
    os.symlink("sub", src / "dir-link")
    # Modes.
    (src / "setuid").write_bytes(b"#!/bin/sh\n")
    os.chmod(src / "setuid", 0o4755)
    (src / "sticky-dir").mkdir()
    os.chmod(src / "sticky-dir", 0o1777)
    (src / "setgid-dir").mkdir()
    os.chmod(src / "setgid-dir", 0o2750)
    (src / "readonly").write_bytes(b"ro")
    os.chmod(src / "readonly", 0o400)
    # Ownership.
    (src / "owned").write_bytes(b"owned by someone else")
    if IS_ROOT:
        os.chown(src / "owned", 1234, 5678)
        os.chown(src / "sub", 4321, 8765)
        os.chown(src / "dangling", 1111, 2222, follow_symlinks=False)
    # xattrs on a file and a directory.
    os.setxattr(src / "small.txt", b"user.comment", b"hi \x00 there")
    os.setxattr(src / "small.txt", b"user.empty", b"")
    os.setxattr(src / "sub", b"user.dir", b"dir attr")
    # Special files: recorded, never opened.
    os.mkfifo(src / "fifo", 0o640)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    # Times with ns precision (set last: creating children changes a directory's mtime).
    for i, p in enumerate(sorted(src.rglob("*"), key=lambda p: -len(p.parts))):
        os.utime(
            p,
            ns=(1_600_000_000_123_456_789 + i, 1_500_000_000_987_654_321 + i),
            follow_symlinks=False,
        )
    return src


async def test_full_round_trip(env: Env, workdir: Path) -> None:
    src = build_source(workdir)
    progress: list[common_pb2.Progress] = []
    r = await backup(env, src, on_progress=progress.append, tags=["t1"], hostname="h1")
    assert not r.partial, r.warnings
    assert r.info.root and len(r.info.id) == 32 and list(r.info.tags) == ["t1"]
    assert r.info.stats.errors == 0 and r.info.stats.files == 13
    assert progress and progress[-1].files_done == progress[-1].files_total == 13
    assert progress[-1].bytes_done == progress[-1].bytes_total > 9 * 1024 * 1024
    dst = workdir / "dst"
    res = await restore(env, r.info, dst)
    assert res.errors == []
    assert res.skipped == []  # the socket node is recreated too
    assert res.files == 13 and res.dirs == 7
    assert_same_tree(src, dst)
    # Hard links share one inode again.
    ino = {os.stat(dst / p).st_ino for p in ("linked", "sub/linked-2", "sub/deeper/linked-3")}
    assert len(ino) == 1 and os.stat(dst / "linked").st_nlink == 3
    if IS_ROOT:
        assert os.lstat(dst / "owned").st_uid == 1234 and os.lstat(dst / "dangling").st_gid == 2222
    assert stat.S_ISFIFO(os.lstat(dst / "fifo").st_mode)
    # The target itself was created by the restore, so it carries the source directory's metadata.
    assert os.stat(dst).st_mtime_ns == os.stat(src).st_mtime_ns


async def test_sparse_3gib_file(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    p = src / "disk.img"
    with open(p, "wb") as f:
        f.truncate(3 * GiB)
        for off in (0, GiB + 12345, 3 * GiB - 4096):
            f.seek(off)
            f.write(b"data block %d " % off * 100)
    t0 = time.monotonic()
    r = await backup(env, src)
    assert not r.partial
    dst = workdir / "dst"
    res = await restore(env, r.info, dst)
    elapsed = time.monotonic() - t0
    assert res.errors == []
    q = dst / "disk.img"
    sa, sb = os.stat(p), os.stat(q)
    assert sb.st_size == 3 * GiB and sb.st_mtime_ns == sa.st_mtime_ns
    assert sb.st_blocks * 512 < 16 * 1024 * 1024, "restored file is not sparse"
    with open(p, "rb") as fa, open(q, "rb") as fb:
        for off in (0, GiB + 12345, 3 * GiB - 4096, 2 * GiB):
            fa.seek(off)
            fb.seek(off)
            assert fa.read(8192) == fb.read(8192)
    assert elapsed < 60


async def test_second_backup_reads_nothing_and_uploads_no_data(env: Env, workdir: Path) -> None:
    src = build_source(workdir)
    r1 = await backup(env, src)
    assert r1.files_read == 11 and r1.data_blobs_new > 0  # 13 names, one inode shared by 3 of them
    sent = len(env.repo.data_sent())
    progress: list[common_pb2.Progress] = []
    r2 = await backup(env, src, parent=r1.info.id, on_progress=progress.append)
    assert r2.files_read == 0
    # All 13 names are unchanged: the two extra hard links share their (unread) first link's content.
    assert r2.progress.files_unchanged == 13 and progress[-1].files_unchanged == 13
    assert r2.data_blobs_new == 0 and len(env.repo.data_sent()) == sent
    assert r2.info.parent == r1.info.id and r2.info.id != r1.info.id
    # A changed file is read again; the cache is not consulted for it.
    (src / "small.txt").write_bytes(b"changed")
    r3 = await backup(env, src)
    assert r3.files_read == 1 and r3.data_blobs_new == 1
    res = await restore(env, r3.info, workdir / "dst")
    assert res.errors == []
    assert (workdir / "dst" / "small.txt").read_bytes() == b"changed"


async def test_unchanged_files_are_not_listed_again(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A files-cache hit takes its node, xattrs included, from the cache: nothing is listed
    (setting or removing an xattr moves the ctime); a file that gains an xattr is listed and
    read again, and the snapshot carries the new xattr and the old ones."""
    from agent import backup as backup_mod

    src = workdir / "src"
    src.mkdir()
    for i in range(5):
        (src / f"plain{i}").write_bytes(b"%d" % i)
    (src / "tagged").write_bytes(b"t")
    os.setxattr(src / "tagged", b"user.tag", b"1")
    await backup(env, src)
    listed: list[bytes | int] = []
    real = backup_mod.read_xattrs

    def counting(path: bytes | int) -> list[tuple[bytes, bytes]]:
        listed.append(path)
        return real(path)

    monkeypatch.setattr(backup_mod, "read_xattrs", counting)
    r2 = await backup(env, src)
    assert r2.files_read == 0
    names = {os.path.basename(p) for p in listed if isinstance(p, bytes)}
    assert names == {b"src"}  # the root directory only
    os.setxattr(src / "plain0", b"user.new", b"yes")  # content unchanged, ctime moves
    listed.clear()
    r3 = await backup(env, src)
    assert r3.files_read == 1  # the stat tuple no longer matches: read again
    assert b"plain0" in {os.path.basename(p) for p in listed if isinstance(p, bytes)}
    dst = workdir / "dst"
    assert (await restore(env, r3.info, dst)).errors == []
    assert os.getxattr(dst / "plain0", b"user.new") == b"yes"
    assert os.getxattr(dst / "tagged", b"user.tag") == b"1"


async def test_nodes_from_the_files_cache_are_the_nodes_a_walk_builds(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unchanged backup that re-uses the cached nodes gives the very trees (the same root
    id) as one that builds every node from lstat; a cached node whose atime, or whose owner's
    name, no longer holds is built again."""
    import marshal
    import struct

    from agent import backup as backup_mod
    from agent.filescache import _FLAGS, MAGIC, NODE, _body_end

    src = build_source(workdir)
    os.setxattr(src / "small.txt", b"user.k", b"v")
    await backup(env, src)
    await backup(env, src)  # the directories' atimes settle after their first listing
    built: list[bytes] = []
    real = backup_mod.node_from_stat

    def counting(name: bytes, st: os.stat_result, owners: object) -> object:
        built.append(name)
        return real(name, st, owners)  # type: ignore[arg-type]

    monkeypatch.setattr(backup_mod, "node_from_stat", counting)
    fast = await backup(env, src)
    assert fast.files_read == 0
    assert b"small.txt" not in built and b"multi-chunk.bin" not in built
    assert b"linked" in built  # hard links: always built (the links share one node's content)
    monkeypatch.setattr(backup_mod._Backup, "_cached_names_hold", lambda self: False)
    built.clear()
    slow = await backup(env, src)
    assert b"small.txt" in built and slow.files_read == 0
    assert slow.info.root == fast.info.root
    monkeypatch.undo()
    monkeypatch.setattr(backup_mod, "node_from_stat", counting)

    # The cache says small.txt had another atime (a reader touched it): its node is built.
    [path] = Path(env.cache_dir).glob("files.*.cache")
    raw = path.read_bytes()
    scope, entries, names = marshal.loads(raw[len(MAGIC) :])
    value = entries[b"small.txt"]
    assert value[_FLAGS] & NODE
    end = _body_end(value)
    (atime,) = struct.unpack_from("<q", value, end)
    assert atime == os.lstat(src / "small.txt").st_atime_ns
    entries[b"small.txt"] = value[:end] + struct.pack("<q", atime - 1) + value[end + 8 :]
    path.write_bytes(MAGIC + marshal.dumps((scope, entries, names)))
    built.clear()
    again = await backup(env, src)
    assert built.count(b"small.txt") == 1 and b"name with spaces" not in built
    assert again.info.root == fast.info.root

    # An owner's name the cached nodes carry resolves differently now: every node is built,
    # and the next run trusts the cache again.
    scope, entries, names = marshal.loads(path.read_bytes()[len(MAGIC) :])
    uid = os.lstat(src / "small.txt").st_uid
    assert uid in names[0]
    names[0][uid] = names[0][uid] + "-renamed"
    path.write_bytes(MAGIC + marshal.dumps((scope, entries, names)))
    built.clear()
    renamed = await backup(env, src)
    assert b"small.txt" in built and b"name with spaces" in built
    assert renamed.info.root == fast.info.root
    built.clear()
    await backup(env, src)
    assert b"small.txt" not in built


async def test_cache_hit_whose_blobs_vanished_is_reread(
    env: Env, workdir: Path, tmp_path: Path
) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "f").write_bytes(os.urandom(1000))
    await backup(env, src)
    # A new, empty repository with the same key material and cache scope: cached ids are not stored there.
    other = make_env(tmp_path / "other")
    try:
        other.keys = env.keys
        import dataclasses

        other.cfg = dataclasses.replace(env.cfg)
        other.repo.store.backend.put("config", env.cfg.to_json())  # same repo id and key check
        r = await run_backup(
            other.repo,
            env.keys,
            other.cfg,
            src,
            agent="n",
            source="vol",
            job_id="j",
            cache_dir=env.cache_dir,
        )
        assert r.files_read == 1 and r.data_blobs_new == 1
        res = await run_restore(
            other.repo, env.keys, other.cfg, r.info, workdir / "dst", job_id="r"
        )
        assert res.errors == [] and (workdir / "dst" / "f").read_bytes() == (src / "f").read_bytes()
    finally:
        close_env(other)


async def test_two_agents_store_data_once(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "a").write_bytes(os.urandom(3 * 1024 * 1024))
    (src / "b").write_bytes(os.urandom(1000))
    r1 = await backup(env, src, agent="node-1", cache_dir=workdir / "state1")
    data1 = env.repo.data_sent()
    packs1 = sorted(env.repo.store.backend.list("data/"))
    r2 = await backup(env, src, agent="node-2", cache_dir=workdir / "state2")
    assert r2.files_read == 2 and r2.data_blobs_new == 0
    assert env.repo.data_sent() == data1
    assert r2.progress.blobs_dedup >= 2
    assert r1.info.agent != r2.info.agent and r1.info.root == r2.info.root  # same data, same trees
    # Only tree blobs (if any) may have been added.
    assert env.repo.store.catalog.count_blobs() == len(set(data1)) + len(
        {i for i, t in env.repo.sent if t == common_pb2.BLOB_TYPE_TREE}
    )
    assert len(sorted(env.repo.store.backend.list("data/"))) >= len(packs1)


async def test_restore_refuses_escaping_paths(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    r = await backup(env, src)
    for bad in (b"../etc", b"a/../../x", b"/etc/passwd", b"a\0b"):
        with pytest.raises(UsageError):
            await restore(env, r.info, workdir / "dst", paths=[bad])
    assert not (workdir / "dst").exists()


async def test_restore_selected_paths(env: Env, workdir: Path) -> None:
    src = build_source(workdir)
    r = await backup(env, src)
    dst = workdir / "dst"
    res = await restore(env, r.info, dst, paths=[b"sub/deeper", b"./small.txt", b"nope"])
    assert len(res.errors) == 1 and "nope" in res.errors[0]
    got = {os.fsdecode(k) for k in walk(dst)}
    assert got == {
        "small.txt",
        "sub",
        "sub/deeper",
        "sub/deeper/dup-of-small.txt",
        "sub/deeper/linked-3",
    }
    assert (dst / "sub/deeper/linked-3").read_bytes() == b"L" * 5000


async def test_planted_symlinks_are_never_followed(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(b"inside")
    (src / "top").write_bytes(b"top")
    r = await backup(env, src)
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "top").write_bytes(b"precious")
    dst = workdir / "dst"
    dst.mkdir()
    os.symlink(outside, dst / "d")  # a directory the snapshot has, planted as a symlink
    os.symlink(outside / "top", dst / "top")  # a file the snapshot has, planted as a symlink
    res = await restore(env, r.info, dst)
    assert len(res.errors) == 2 and all("already exists" in e for e in res.errors)
    assert sorted(os.listdir(outside)) == ["top"] and (outside / "top").read_bytes() == b"precious"
    res = await restore(env, r.info, dst, overwrite=True)
    assert res.errors == []
    assert sorted(os.listdir(outside)) == ["top"] and (outside / "top").read_bytes() == b"precious"
    assert not os.path.islink(dst / "d") and (dst / "d" / "f").read_bytes() == b"inside"
    assert not os.path.islink(dst / "top") and (dst / "top").read_bytes() == b"top"


async def test_restored_symlink_does_not_redirect_later_writes(env: Env, workdir: Path) -> None:
    # A snapshot whose symlink 'a' points outside, and a directory 'a'-like path can't be
    # smuggled: names are validated, and writes go through O_NOFOLLOW directory fds.
    src = workdir / "src"
    src.mkdir()
    outside = workdir / "outside"
    outside.mkdir()
    os.symlink(outside, src / "escape")
    (src / "z").write_bytes(b"z")
    r = await backup(env, src)
    res = await restore(env, r.info, workdir / "dst")
    assert res.errors == [] and os.readlink(workdir / "dst" / "escape") == str(outside)
    assert os.listdir(outside) == []


async def test_existing_file_without_and_with_overwrite(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "a").write_bytes(b"new content")
    (src / "b").write_bytes(b"b")
    r = await backup(env, src)
    dst = workdir / "dst"
    dst.mkdir()
    (dst / "a").write_bytes(b"old")
    res = await restore(env, r.info, dst)
    assert len(res.errors) == 1 and "a" in res.errors[0] and res.files == 1
    assert (dst / "a").read_bytes() == b"old" and (dst / "b").read_bytes() == b"b"
    res = await restore(env, r.info, dst, overwrite=True)
    assert res.errors == [] and (dst / "a").read_bytes() == b"new content"
    assert not [n for n in os.listdir(dst) if n.startswith(".clawback")]


async def test_corrupted_blob_fails_only_its_file(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "victim").write_bytes(os.urandom(2 * 1024 * 1024))
    (src / "ok1").write_bytes(os.urandom(5000))
    (src / "ok2").write_bytes(b"fine")
    r = await backup(env, src)
    victim_ids = [i for i in env.repo.data_sent()]
    victim = await _file_chunk(env, r, b"victim")
    assert victim in victim_ids
    env.repo.corrupt_on_disk(victim)
    dst = workdir / "dst"
    res = await restore(env, r.info, dst)
    assert len(res.errors) == 1 and "victim" in res.errors[0]
    assert sorted(os.listdir(dst)) == ["ok1", "ok2"]
    assert (dst / "ok1").read_bytes() == (src / "ok1").read_bytes()


async def test_tampered_envelope_fails_authentication(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "victim").write_bytes(b"v" * 10000)
    (src / "ok").write_bytes(b"fine")
    r = await backup(env, src)
    victim = await _file_chunk(env, r, b"victim")

    def tamper(bid: bytes, env_: bytes) -> bytes:
        if bid != victim:
            return env_
        b = bytearray(env_)
        b[-1] ^= 1
        return bytes(b)

    env.repo.tamper = tamper
    res = await restore(env, r.info, workdir / "dst")
    assert len(res.errors) == 1 and "authentication failed" in res.errors[0]
    assert os.listdir(workdir / "dst") == ["ok"]


async def _file_chunk(env: Env, r: BackupResult, name: bytes) -> bytes:
    """The first chunk id of a top-level file, read through the restore's own tree code."""
    from agent.restore import _File, _Restore

    rs = _Restore(
        env.repo,
        env.keys,
        r.info,
        Path("/nonexistent"),
        job_id="x",
        paths=[],
        overwrite=False,
        on_progress=None,
        workers=1,
        clock=ManualClock(),
    )
    await rs.load_trees()
    f = next(e for e in rs.entries[()] if e.name == name)
    assert isinstance(f, _File) and f.ids
    return f.ids[:32]


async def test_wrong_key_file_is_refused(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a")
    r = await backup(env, src)
    create_key_file(workdir / "other.key")
    wrong = FileKeyProvider(workdir / "other.key")
    with pytest.raises(KeyMaterialError, match="key check"):
        await run_backup(
            env.repo,
            wrong,
            env.cfg,
            src,
            agent="n",
            source="s",
            job_id="j",
            cache_dir=env.cache_dir,
        )
    with pytest.raises(KeyMaterialError, match="wrong key file"):
        await run_restore(env.repo, wrong, env.cfg, r.info, workdir / "dst", job_id="r")
    assert env.repo.sent and all(t for _, t in env.repo.sent)


async def test_unreadable_entries_become_warnings(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    (src / "vanishes").write_bytes(b"x" * 100)
    (src / "becomes-fifo").write_bytes(b"y" * 100)
    (src / "stays").write_bytes(b"z" * 100)
    calls = 0

    def sabotage(p: common_pb2.Progress) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # right after the walk, before any file is read
            os.unlink(src / "vanishes")
            os.unlink(src / "becomes-fifo")
            os.mkfifo(src / "becomes-fifo")

    r = await asyncio.wait_for(backup(env, src, on_progress=sabotage), 30)
    assert r.partial and len(r.warnings) == 2
    assert any("vanish" in w for w in r.warnings) and any("changed type" in w for w in r.warnings)
    assert r.info.stats.errors == 2 and r.info.stats.files == 1
    res = await restore(env, r.info, workdir / "dst")
    assert res.errors == [] and os.listdir(workdir / "dst") == ["stays"]


async def test_missing_source_is_an_error(env: Env, workdir: Path) -> None:
    from core.errors import NotFound

    with pytest.raises(NotFound):
        await backup(env, workdir / "nope")
    (workdir / "file").write_bytes(b"")
    with pytest.raises(UsageError):
        await backup(env, workdir / "file")


async def test_progress_is_throttled(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    src.mkdir()
    for i in range(600):
        (src / f"f{i}").write_bytes(os.urandom(100))
    clock = ManualClock()
    seen: list[common_pb2.Progress] = []
    r = await backup(env, src, on_progress=seen.append, clock=clock)
    # The clock never moves: only the forced first and last reports are sent.
    assert len(seen) == 2
    assert seen[-1].files_done == 600 and seen[-1].blobs_new == r.progress.blobs_new


async def test_a_finished_backup_leaves_nothing_for_the_cycle_collector(
    env: Env, workdir: Path
) -> None:
    """The run's tree is freed when the run returns, not at the next full collection (a
    reference cycle kept every job's tree alive: the agent grew ~100 MiB per backup)."""
    import gc

    from agent import backup as backup_mod

    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    for i in range(20):
        (src / "d" / f"f{i}").write_bytes(os.urandom(3000 + i))
    (src / "big").write_bytes(os.urandom(9 << 20))  # a large file: the batched path too

    def live_dirs() -> int:
        return sum(1 for o in gc.get_objects() if isinstance(o, backup_mod._Dir))

    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(2):  # a full backup, then one from the files cache
            await backup(env, src)
            await asyncio.sleep(0)
            assert live_dirs() == 0
    finally:
        if enabled:
            gc.enable()


async def test_a_refused_upload_fails_the_run_and_stops_every_thread(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator's refusal (here: disk full) is what the run raises, whichever stage-2
    thread met it, and no thread of the run is left behind; nothing is committed."""
    import threading

    from core.errors import ResourceExhausted
    from tests.agent.conftest import StoreUpload

    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    for i in range(300):
        (src / "d" / f"f{i}").write_bytes(os.urandom(20_000))
    (src / "big").write_bytes(os.urandom(12 << 20))
    sent = 0

    async def refuse(self: StoreUpload, message: bytes) -> None:
        nonlocal sent
        sent += 1
        if sent > 2:
            raise ResourceExhausted("coordinator disk full: writing a pack")

    monkeypatch.setattr(StoreUpload, "send_message", refuse)
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ResourceExhausted, match="disk full"):
        await backup(env, src)
    for _ in range(100):  # the threads finish the piece of work they are in, then stop
        left = [t for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not any(t.name.startswith("clawback-backup") for t in left):
            break
        await asyncio.sleep(0.05)
    assert not [t.name for t in left if t.name.startswith("clawback-backup")]
    assert env.repo.store.catalog.list_snapshots() == []


async def test_a_cancelled_backup_stops_walking_inside_a_large_directory(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling the run stops the walk within 1,024 entries, not at the end of a directory
    of millions."""
    import threading

    from agent import backup as backup_mod

    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    for i in range(5000):
        (src / "d" / f"f{i}").touch()
    calls = 0
    reached, go, walked = threading.Event(), threading.Event(), threading.Event()
    real_node, real_walk = backup_mod.node_from_stat, backup_mod._Backup.walk

    def node(*a: object, **kw: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 50:
            reached.set()
            go.wait(30)
        return real_node(*a, **kw)  # type: ignore[arg-type]

    def walk(self: object, emit: object) -> object:
        try:
            return real_walk(self, emit)  # type: ignore[arg-type]
        finally:
            walked.set()

    monkeypatch.setattr(backup_mod, "node_from_stat", node)
    monkeypatch.setattr(backup_mod._Backup, "walk", walk)
    task = asyncio.ensure_future(backup(env, src))
    assert await asyncio.to_thread(reached.wait, 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    go.set()
    assert await asyncio.to_thread(walked.wait, 30)
    assert 50 <= calls <= backup_mod.STOP_CHECK_MASK + 3, calls  # the root, d, 1,024 in d
    assert env.repo.store.catalog.list_snapshots() == []


async def test_many_small_files(env: Env, workdir: Path) -> None:
    """10,000 tiny files: all backed up, none read again when unchanged, all restored
    (how fast is bench/'s to measure, not a test's)."""
    src = workdir / "src"
    for d in range(40):
        (src / f"d{d}").mkdir(parents=True)
        for i in range(250):
            (src / f"d{d}" / f"f{i}").write_bytes(b"%d-%d" % (d, i))
    r = await backup(env, src)
    assert r.info.stats.files == 10_000 and r.files_read == 10_000
    r2 = await backup(env, src)
    assert r2.files_read == 0 and r2.info.stats.files_unchanged == 10_000
    res = await restore(env, r2.info, workdir / "dst")
    assert res.errors == [] and res.files == 10_000


# -- property: random small trees round-trip ----------------------------------------------------

names = st.binary(min_size=1, max_size=12).filter(
    lambda b: b not in (b".", b"..") and b"/" not in b and b"\0" not in b
)
contents = st.one_of(st.binary(max_size=300), st.sampled_from([b"", b"\0" * 5000]))


@st.composite
def trees(draw: st.DrawFn, depth: int = 0) -> dict[bytes, object]:
    entries = draw(st.dictionaries(names, st.one_of(contents, st.just(None)), max_size=5))
    out: dict[bytes, object] = dict(entries)
    if depth < 2:
        for n in draw(st.lists(names, max_size=2, unique=True)):
            out[n + b".d"] = draw(trees(depth + 1))
    return out


def materialize(root: bytes, t: dict[bytes, object]) -> None:
    os.mkdir(root)
    for name, v in t.items():
        p = os.path.join(root, name)
        if isinstance(v, dict):
            materialize(p, v)
        elif v is None:
            os.symlink(name + b"-target", p)
        else:
            with open(p, "wb") as f:
                f.write(v)  # type: ignore[arg-type]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=trees())
def test_random_trees_round_trip(t: dict[bytes, object]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        e = make_env(Path(tmp))
        try:
            src = os.path.join(os.fsencode(tmp), b"src")
            materialize(src, t)

            async def go() -> RestoreResult:
                r = await run_backup(
                    e.repo,
                    e.keys,
                    e.cfg,
                    Path(os.fsdecode(src)),
                    agent="a",
                    source="s",
                    job_id="j",
                    cache_dir=e.cache_dir,
                    workers=random.choice([1, 2, 3]),
                )
                assert not r.partial, r.warnings
                return await run_restore(
                    e.repo, e.keys, e.cfg, r.info, Path(tmp) / "dst", job_id="r"
                )

            res = asyncio.run(go())
            assert res.errors == []
            assert_same_tree(Path(os.fsdecode(src)), Path(tmp) / "dst", times=False)
        finally:
            close_env(e)


async def test_changed_large_files_are_read_before_the_walk_reaches_them(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A large file the files cache knows, changed since, starts reading before the walk; the
    walk puts it in its directory. One gone before the walk meets it stays out of the
    snapshot, and one behind a directory replaced by a symlink is not read at all."""
    from agent import backup as backup_mod

    src = workdir / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "c").mkdir()
    rnd = random.Random(3)
    for i in range(20):
        (src / "a" / f"small{i}").write_bytes(b"%d" % i)
    (src / "a" / "b" / "db.bin").write_bytes(rnd.randbytes(6 * 1024 * 1024))
    (src / "c" / "moved.bin").write_bytes(rnd.randbytes(5 * 1024 * 1024))
    (src / "c" / "linked.bin").write_bytes(rnd.randbytes(5 * 1024 * 1024))
    await backup(env, src)

    early: list[list[bytes]] = []
    real = backup_mod._Backup._start_known_large

    def spy(self: backup_mod._Backup) -> None:
        real(self)
        early.append(sorted(self._early))
        # Between the early look and the walk, a file moves elsewhere.
        if (src / "c" / "moved.bin").exists():
            os.rename(src / "c" / "moved.bin", src / "a" / "renamed.bin")

    monkeypatch.setattr(backup_mod._Backup, "_start_known_large", spy)
    with open(src / "a" / "b" / "db.bin", "r+b") as fh:
        fh.seek(3 * 1024 * 1024)
        fh.write(b"changed page")
    with open(src / "c" / "moved.bin", "ab") as fh:
        fh.write(b"appended")
    r2 = await backup(env, src)
    assert early == [[b"a/b/db.bin", b"c/moved.bin"]]
    assert r2.warnings == [] and not r2.partial
    dst = workdir / "dst"
    assert (await restore(env, r2.info, dst)).errors == []
    assert_same_tree(src, dst)

    # A directory replaced by a symlink to a copy outside the source: the changed file
    # behind it is not looked at early, and not read.
    outside = workdir / "outside"
    (src / "c").rename(outside)
    with open(outside / "linked.bin", "ab") as fh:
        fh.write(b"changed outside")
    (src / "c").symlink_to(outside)
    early.clear()
    r3 = await backup(env, src)
    assert early == [[]]
    assert r3.files_read == 0
    dst3 = workdir / "dst3"
    assert (await restore(env, r3.info, dst3)).errors == []
    assert os.readlink(dst3 / "c") == str(outside)
    assert_same_tree(src, dst3)


async def test_database_files_cut_on_a_fixed_grid_re_upload_only_changed_pages(
    env: Env, workdir: Path
) -> None:
    """design.md §Paged files: in a repository with the policy, a page rewritten in place
    costs one 64 KiB chunk; other files are still cut by content."""
    env.cfg = dataclasses.replace(
        env.cfg, paged_chunker="fixed-64k", paged_files=format.DEFAULT_PAGED_FILES
    )
    src = workdir / "src"
    (src / "app").mkdir(parents=True)
    rnd = random.Random(11)
    big, small = src / "app" / "state.db", src / "cache.sqlite"
    big.write_bytes(rnd.randbytes(4 * 1024 * 1024 + 3000))  # stage 2's large-file path
    small.write_bytes(rnd.randbytes(300 * 1024))  # a small-file group
    (src / "notes.txt").write_bytes(rnd.randbytes(50 * 1024))  # below the CDC minimum
    r1 = await backup(env, src)
    assert r1.data_blobs_new == 65 + 5 + 1  # ceil(size / 64 KiB) for each database file
    for db in (big, small):
        with open(db, "r+b") as f:
            os.pwrite(f.fileno(), rnd.randbytes(8192), 139_264)  # one 8 KiB page, in place
    r2 = await backup(env, src, parent=r1.info.id)
    assert r2.files_read == 2 and r2.data_blobs_new == 2
    assert r2.progress.bytes_uploaded < 2 * 65_536 + 16_384  # two chunks and the trees
    res = await restore(env, r2.info, workdir / "dst")
    assert res.errors == []
    assert_same_tree(src, workdir / "dst")


async def test_database_files_recognised_by_their_first_bytes_whatever_their_names(
    env: Env, workdir: Path
) -> None:
    """design.md §Paged files: a SQLite file called `History` and etcd's bbolt file `db` are cut
    on the grid by their headers; a file of the same bytes but another header is not."""
    env.cfg = dataclasses.replace(
        env.cfg,
        paged_chunker="fixed-64k",
        paged_files=format.DEFAULT_PAGED_FILES,
        paged_formats=format.DEFAULT_PAGED_FORMATS,
    )
    src = workdir / "src"
    (src / "member" / "snap").mkdir(parents=True)
    rnd = random.Random(12)
    body = rnd.randbytes(4 * 1024 * 1024)
    sqlite = src / "History"  # a small-file group
    sqlite.write_bytes(b"SQLite format 3\x00" + body[: 300 * 1024])
    bolt = src / "member" / "snap" / "db"  # stage 2's large-file path
    bolt.write_bytes(bytes(16) + b"\xed\xda\x0c\xed\x02\x00\x00\x00" + body + b"tail")
    other = src / "blob"  # content-defined: a header of no known format
    other.write_bytes(b"SQLite format 2\x00" + body[: 300 * 1024])
    r1 = await backup(env, src)
    with open(other, "rb") as f:
        by_content = len(list(Chunker(params("fastcdc-256k")).chunks_of_fd(f.fileno(), 307_216)))
    grid = -(-sqlite.stat().st_size // 65_536) + -(-bolt.stat().st_size // 65_536)
    assert (grid, by_content) == (5 + 65, 2)
    assert r1.data_blobs_new == grid + by_content
    for path in (sqlite, bolt, other):
        with open(path, "r+b") as f:
            os.pwrite(f.fileno(), rnd.randbytes(4096), 139_264)  # one 4 KiB page, in place
    r2 = await backup(env, src, parent=r1.info.id)
    assert r2.files_read == 3 and r2.data_blobs_new == 3  # one chunk changed in each
    res = await restore(env, r2.info, workdir / "dst")
    assert res.errors == []
    assert_same_tree(src, workdir / "dst")


@pytest.mark.racy_window
async def test_files_changed_just_before_the_backup_are_read_again_next_time(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """design.md §Files cache: a file whose times are within the racy window of its opening
    is not recorded, since a second write in the same timestamp tick would leave its stat
    tuple as it was. Once its times are older than the window, it is trusted as before."""
    from agent import backup as backup_mod

    window_s = 1.0
    monkeypatch.setattr(backup_mod, "RACY_WINDOW_NS", int(window_s * 1e9))  # the real one: 2 s
    src = workdir / "src"
    src.mkdir()
    (src / "counter").write_bytes(b"1" * 1000)
    r1 = await backup(env, src)  # opened within the window of the write: not recorded
    r2 = await backup(env, src, parent=r1.info.id)
    assert (r1.files_read, r2.files_read) == (1, 1)  # unchanged, yet read again
    time.sleep(window_s + 0.1)  # its times are now older than the window
    r3 = await backup(env, src, parent=r2.info.id)
    r4 = await backup(env, src, parent=r3.info.id)
    assert (r3.files_read, r4.files_read) == (1, 0)  # recorded by r3, trusted by r4
    assert r4.progress.files_unchanged == 1
    res = await restore(env, r4.info, workdir / "dst")
    assert res.errors == [] and (workdir / "dst" / "counter").read_bytes() == b"1" * 1000


@pytest.mark.racy_window
async def test_a_file_dated_in_the_future_is_still_cached(env: Env, workdir: Path) -> None:
    """The racy window looks at the ctime, which the kernel sets: an mtime in the future (an
    archive from a clock-skewed machine) does not keep a file out of the files cache."""
    src = workdir / "src"
    src.mkdir()
    p = src / "from-the-future"
    p.write_bytes(b"f" * 100)
    future = time.time_ns() + 10 * 365 * 86_400 * 10**9
    os.utime(p, ns=(future, future))
    st = p.stat()
    # The ctime moved with utime: wait until it is out of the window (RACY_WINDOW_NS, 2 s).
    from agent import backup as backup_mod

    time.sleep(max(0.0, (st.st_ctime_ns + backup_mod.RACY_WINDOW_NS - time.time_ns()) / 1e9) + 0.1)
    r1 = await backup(env, src)
    r2 = await backup(env, src, parent=r1.info.id)
    assert (r1.files_read, r2.files_read) == (1, 0)
