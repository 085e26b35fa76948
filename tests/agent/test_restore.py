"""The restore pipeline's content stage: pack-order streaming, parked files, raw batches, bounded
memory, and what a failure leaves behind (design.md §Trees, §Blob traffic)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import resource
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent import restore as restore_mod
from agent.backup import BackupResult, run_backup
from agent.repo import Blob
from agent.restore import RestoreResult, run_restore
from bench.verify import compare_trees
from core.clock import ManualClock
from core.errors import TransportError
from protos.clawback.v1 import common_pb2
from tests.agent.conftest import Env, StoreRepo


async def backup(env: Env, src: Path) -> BackupResult:
    return await run_backup(
        env.repo, env.keys, env.cfg, src, agent="n", source="s", job_id="b", cache_dir=env.cache_dir
    )


async def restore(
    env: Env, repo: object, info: common_pb2.SnapshotInfo, dst: Path, **kw: object
) -> RestoreResult:
    return await run_restore(repo, env.keys, env.cfg, info, dst, job_id="r", **kw)  # type: ignore[arg-type]


def big_tree(src: Path, files: int = 12, size: int = 3 * 1024 * 1024) -> None:
    """Multi-chunk files (chunks of ~1 MiB), some sharing content, plus small and empty ones."""
    src.mkdir()
    shared = os.urandom(size)
    for i in range(files):
        (src / f"big{i}").write_bytes(shared if i % 3 == 0 else os.urandom(size))
    (src / "sub").mkdir()
    for i in range(50):
        (src / "sub" / f"small{i}").write_bytes(b"%d " % i * (i + 1))
    (src / "sub" / "empty").write_bytes(b"")
    with open(src / "sparse", "wb") as f:
        f.truncate(8 * 1024 * 1024)
        f.seek(3 * 1024 * 1024)
        f.write(os.urandom(4096))


@dataclass
class BatchRepo:
    """A RepoClient offering `download_batches` as agent/client.py does: envelopes are views."""

    inner: StoreRepo
    batch_bytes: int = 300_000
    drop: frozenset[bytes] = frozenset()  # ids the "coordinator" never returns
    fail_after: int = -1  # batches served before the stream breaks
    stall_after: int = -1  # batches served before the stream stalls (until cancelled)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)  # set when it does
    shuffle: int | None = None  # a seed: the blobs come back in a random order, not pack order

    async def _blobs(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        if self.shuffle is None:
            async for b in self.inner.download(job_id, ids):
                yield b
            return
        blobs = [b async for b in self.inner.download(job_id, ids)]
        random.Random(self.shuffle).shuffle(blobs)
        for b in blobs:
            yield b

    async def download_batches(
        self, job_id: str, ids: Sequence[bytes]
    ) -> AsyncIterator[list[tuple[bytes, int, memoryview | None, str]]]:
        batch: list[tuple[bytes, int, memoryview | None, str]] = []
        size = served = 0
        async for b in self._blobs(job_id, ids):
            if b.id in self.drop:
                continue
            batch.append(
                (b.id, b.type, None if b.envelope is None else memoryview(b.envelope), b.error)
            )
            size += len(b.envelope or b"")
            if size >= self.batch_bytes:
                if served == self.fail_after:
                    raise TransportError("download: stream cut")
                if served == self.stall_after:
                    self.stalled.set()
                    await asyncio.Event().wait()
                yield batch
                served += 1
                batch, size = [], 0
        if batch:
            yield batch

    async def download(self, job_id: str, ids: Sequence[bytes]) -> AsyncIterator[Blob]:
        raise AssertionError("download_batches is preferred")
        yield  # pragma: no cover

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


async def test_raw_batches_round_trip(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    big_tree(src)
    r = await backup(env, src)
    res = await restore(env, BatchRepo(env.repo), r.info, workdir / "dst")
    assert res.errors == []
    assert compare_trees(src, workdir / "dst") == []
    # Every blob was asked for once, however many files use it.
    assert len(env.repo.downloaded) == len(set(env.repo.downloaded))


async def test_the_restore_logs_how_long_each_stage_took(
    env: Env, workdir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    src = workdir / "src"
    big_tree(src, files=3)
    r = await backup(env, src)
    with caplog.at_level(logging.INFO, logger="clawback.agent.restore"):
        res = await restore(env, BatchRepo(env.repo), r.info, workdir / "dst")
    assert res.errors == []
    [line] = [m for m in caplog.messages if m.startswith(f"restore of {r.info.id} phases")]
    stages = dict(re.findall(r"(\w+) (\d+\.\d+)", line.split(":", 1)[1]))
    assert list(stages) == ["trees", "structure", "content", "metadata"]
    times = [float(v) for v in stages.values()]
    assert times == sorted(times)  # seconds since the start, in the order the stages end


async def test_files_parked_between_blobs_are_reopened(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = workdir / "src"
    big_tree(src)
    r = await backup(env, src)
    monkeypatch.setattr(restore_mod, "MAX_OPEN_FILES", 1)
    monkeypatch.setattr(restore_mod, "ARENA_BYTES", 1024 * 1024)
    res = await restore(env, BatchRepo(env.repo, batch_bytes=50_000), r.info, workdir / "dst")
    assert res.errors == []
    assert compare_trees(src, workdir / "dst") == []


async def test_overwrite_replaces_multi_chunk_files(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    big_tree(src, files=3)
    r = await backup(env, src)
    dst = workdir / "dst"
    dst.mkdir()
    (dst / "big1").write_bytes(b"old")
    (dst / "sub").mkdir()
    (dst / "sub" / "small3").mkdir()  # a directory where a file goes
    res = await restore(env, env.repo, r.info, dst, overwrite=True)
    assert res.errors == []
    assert compare_trees(src / "sub", dst / "sub") == []
    for i in range(3):
        assert (dst / f"big{i}").read_bytes() == (src / f"big{i}").read_bytes()
    assert not [n for _, _, names in os.walk(dst) for n in names if n.startswith(".clawback")]


async def test_a_blob_never_returned_fails_only_its_files(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    big_tree(src, files=3)
    r = await backup(env, src)
    from tests.agent.test_backup_restore import _file_chunk

    lost = await _file_chunk(env, r, b"big1")
    res = await restore(env, BatchRepo(env.repo, drop=frozenset({lost})), r.info, workdir / "dst")
    assert len(res.errors) == 1 and "big1" in res.errors[0]
    assert "not returned by the coordinator" in res.errors[0]
    assert not (workdir / "dst" / "big1").exists()
    assert (workdir / "dst" / "big2").read_bytes() == (src / "big2").read_bytes()


def assert_only_whole_files(src: Path, dst: Path) -> None:
    """What a stopped restore finished is whole; nothing half-written stays under any name."""
    for p in dst.rglob("*"):
        if p.is_file() and not p.is_symlink():
            assert p.read_bytes() == (src / p.relative_to(dst)).read_bytes(), p


async def test_a_broken_stream_leaves_no_partial_file(env: Env, workdir: Path) -> None:
    src = workdir / "src"
    big_tree(src)
    r = await backup(env, src)
    dst = workdir / "dst"
    repo = BatchRepo(env.repo, batch_bytes=50_000, fail_after=5)
    with pytest.raises(TransportError):
        await restore(env, repo, r.info, dst)
    assert_only_whole_files(src, dst)


async def test_a_cancelled_restore_removes_its_partial_files_and_lets_go_of_them(
    env: Env, workdir: Path
) -> None:
    """`clawback job ID --cancel` cancels the agent's restore task: files it had finished
    stay, whole; the ones it was writing are closed and removed."""
    src = workdir / "src"
    big_tree(src)
    r = await backup(env, src)
    dst = workdir / "dst"
    repo = BatchRepo(env.repo, batch_bytes=50_000, stall_after=8)
    task = asyncio.ensure_future(restore(env, repo, r.info, dst))
    await asyncio.wait_for(repo.stalled.wait(), 30)

    def partial() -> set[str]:
        return {
            p.name
            for p in dst.glob("big*")
            if p.stat().st_size < 3 * MIB or p.read_bytes() != (src / p.name).read_bytes()
        }

    # The blobs served before the stall are written meanwhile: wait until that settles
    # (the same files partly written in three looks 0.1 s apart).
    looks: list[set[str]] = []
    for _ in range(300):
        looks = [*looks[-2:], partial()]
        if len(looks) == 3 and looks[0] and looks[0] == looks[1] == looks[2]:
            break
        await asyncio.sleep(0.1)
    cut = looks[-1]
    assert cut, "no file was partly written when the restore was cancelled"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not cut & {p.name for p in dst.glob("big*")}
    assert_only_whole_files(src, dst)
    held = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if str(fd.readlink()).startswith(str(dst)):
                held.append(fd)
        except OSError:
            continue
    assert held == []


def test_groups_bound_the_plaintext_in_flight() -> None:
    r = restore_mod._Restore.__new__(restore_mod._Restore)
    r.uses = {bytes([i]) * 32: s for i, s in enumerate([5, 5, 5, 20, 1, 1])}
    batch = [(bid, 1, memoryview(b"x"), "") for bid in r.uses]
    old = restore_mod.ARENA_BYTES
    try:
        restore_mod.ARENA_BYTES = 10
        groups = list(restore_mod._Restore._groups(r, batch))  # type: ignore[arg-type]
    finally:
        restore_mod.ARENA_BYTES = old
    assert [need for _, need in groups] == [10, 5, 20, 2]  # a blob larger than the bound goes alone
    assert sum(len(g) for g, _ in groups) == len(batch)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o000])
async def test_modes_and_owners_of_files_written_at_once_or_over_several_blobs(
    env: Env, workdir: Path, umask: int
) -> None:
    """Files are created with their final mode and owner where that is safe (a target this
    restore created, modes the umask keeps): the result is the same under any umask."""
    src = workdir / "src"
    src.mkdir()
    modes = [0o644, 0o664, 0o600, 0o444, 0o000, 0o777, 0o4755, 0o2750, 0o1644]
    for m in modes:
        for size in (10, 3 * 1024 * 1024):  # written at once, or over several blobs
            p = src / f"m{m:o}-{size}"
            p.write_bytes(os.urandom(size))
            os.chmod(p, m)
            if os.geteuid() == 0:
                os.chown(p, 0 if m % 2 else 1000, 0 if m % 3 else 1000)
    r = await backup(env, src)
    old = os.umask(umask)
    try:
        res = await restore(env, BatchRepo(env.repo), r.info, workdir / "dst")
    finally:
        os.umask(old)
    assert res.errors == []
    assert compare_trees(src, workdir / "dst") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give files other groups")
async def test_owner_inside_a_setgid_directory(env: Env, workdir: Path) -> None:
    """A target created inside a setgid directory inherits its group and setgid bit, and so
    would new files: each file's recorded owner is set explicitly there."""
    src = workdir / "src"
    (src / "d").mkdir(parents=True)
    for i, (uid, gid) in enumerate([(0, 0), (1000, 1000), (0, 1000)]):
        p = src / "d" / f"f{i}"
        p.write_bytes(b"x" * (i + 1))
        os.chown(p, uid, gid)
    r = await backup(env, src)
    parent = workdir / "sgid"
    parent.mkdir()
    os.chown(parent, 0, 4242)
    os.chmod(parent, 0o2775)
    res = await restore(env, BatchRepo(env.repo), r.info, parent / "dst")
    assert res.errors == []
    for i in range(3):
        got, want = os.stat(parent / "dst" / "d" / f"f{i}"), os.stat(src / "d" / f"f{i}")
        assert (got.st_uid, got.st_gid, got.st_mode) == (want.st_uid, want.st_gid, want.st_mode)
    assert (parent / "dst" / "d" / "f2").read_bytes() == b"xxx"


async def test_the_plan_shares_blobs_and_skips_files_left_out(env: Env, workdir: Path) -> None:
    """One dict holds the plan (docs/performance.md §Agent memory): a blob that is a whole
    small file, a chunk of several large files, or a chunk repeated inside one file is asked
    for once and written everywhere; the blobs of files stage 2 leaves out (an entry in the
    way) come back unused, and the decoded trees are not kept."""
    src = workdir / "src"
    src.mkdir()
    small, big = b"same small file\n" * 10, os.urandom(3 * 1024 * 1024)
    for name in ("s1", "s2", "s3"):
        (src / name).write_bytes(small)
    (src / "alone").write_bytes(b"only here")
    (src / "b1").write_bytes(big)
    (src / "b2").write_bytes(big)
    (src / "twice").write_bytes(big + big)
    r = await backup(env, src)
    dst = workdir / "dst"
    dst.mkdir()
    (dst / "s1").write_bytes(b"in the way")
    (dst / "alone").write_bytes(b"in the way too")
    rs = restore_mod._Restore(
        BatchRepo(env.repo, batch_bytes=50_000),
        env.keys,
        r.info,
        dst,
        job_id="r",
        paths=[],
        overwrite=False,
        on_progress=None,
        workers=2,
        clock=ManualClock(),
    )
    res = await rs.run()
    assert sorted(e.split(":")[0] for e in res.errors) == ["alone", "s1"]
    assert all("already exists" in e for e in res.errors)
    for name in ("s2", "s3", "b1", "b2", "twice"):
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert (dst / "s1").read_bytes() == b"in the way"
    # Each blob was asked for once (also "alone"'s, which came back unused); nothing is left
    # of the plan, and of the trees only the directories' own nodes.
    assert len(env.repo.downloaded) == len(set(env.repo.downloaded))
    assert rs.uses == {} and rs.entries == {}
    assert [(rel, list(node.subtree)) for rel, node in rs.dirs] == [((), [])]


MIB = 1024 * 1024


def mixed_tree(src: Path) -> int:
    """Multi-chunk files whose sizes end anywhere in a block, the same content in two files,
    text, a sparse file with data between holes, small files; their total size in bytes."""
    rnd = random.Random(7)
    src.mkdir()
    for i, size in enumerate((MIB + 1, 3 * MIB + 777, 5 * MIB - 3)):
        (src / f"big{i}").write_bytes(rnd.randbytes(size))
    (src / "copy").write_bytes((src / "big2").read_bytes())
    (src / "log").write_bytes(b"".join(b"line %d of a log\n" % i for i in range(150_000)))
    with open(src / "sparse", "wb") as f:
        f.truncate(12 * MIB)
        for off in (5, 3 * MIB + 1234, 9 * MIB - 77):
            f.seek(off)
            f.write(rnd.randbytes(300_000))
    for i in range(20):
        (src / f"small{i}").write_bytes(rnd.randbytes(i * 300))
    return sum(p.stat().st_size for p in src.iterdir())


async def test_blobs_in_any_order_restore_the_same_files(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The coordinator streams in pack order, which after many backups is not the files'
    order: a file's chunks may come last to first, interleaved with other files'."""
    src = workdir / "src"
    mixed_tree(src)
    r = await backup(env, src)
    monkeypatch.setattr(restore_mod, "ARENA_BYTES", 1 * MIB)  # many small groups
    repo = BatchRepo(env.repo, batch_bytes=200_000, shuffle=3)
    res = await restore(env, repo, r.info, workdir / "dst")
    assert res.errors == []
    assert compare_trees(src, workdir / "dst") == []


async def test_a_full_target_fails_only_the_files_that_do_not_fit(
    env: Env, workdir: Path, ext4_fs: Callable[[int], Path]
) -> None:
    src = workdir / "src"
    total = mixed_tree(src)
    r = await backup(env, src)
    target = ext4_fs(16) / "dst"  # ~12 MiB free for ~19 MiB of data (~30 MiB with holes)
    res = await restore(env, BatchRepo(env.repo), r.info, target)
    assert res.errors and all("No space left on device" in e for e in res.errors), res.errors
    assert 0 < res.bytes < total, res
    # What is there is whole and right; what failed is not left half-written.
    restored = {p.name for p in target.iterdir()}
    assert restored and len(restored) + len(res.errors) == len(list(src.iterdir()))
    for name in restored:
        assert (target / name).read_bytes() == (src / name).read_bytes(), name


async def test_each_directory_is_opened_once_whatever_the_blob_order(
    env: Env, workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pack order visits directories in turn; the restore keeps them open rather than reopen
    a directory (and its ancestors) for every file (MAX_IDLE_DIR_FDS)."""
    src = workdir / "src"
    rnd = random.Random(11)
    dirs = [src]
    for i in range(150):
        d = rnd.choice(dirs) / f"d{i}"
        d.mkdir(parents=True)
        dirs.append(d)
    for i in range(600):
        (rnd.choice(dirs) / f"f{i}").write_bytes(rnd.randbytes(rnd.randrange(1, 3000)))
    r = await backup(env, src)
    opened: list[int] = []
    real_open = os.open

    def counting_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_DIRECTORY:
            opened.append(flags)
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", counting_open)
    res = await restore(
        env, BatchRepo(env.repo, batch_bytes=5_000, shuffle=2), r.info, workdir / "dst"
    )
    monkeypatch.undo()
    assert res.errors == []
    assert compare_trees(src, workdir / "dst") == []
    # The target, each directory once to fill it, and once more each for its metadata.
    assert len(opened) <= 1 + 2 * (len(dirs) - 1), len(opened)


@pytest.mark.parametrize(("soft", "budget"), [(100, 64), (400, 100), (1 << 20, 4096)])
def test_the_directory_fd_budget_follows_the_descriptor_limit(soft: int, budget: int) -> None:
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    if old[1] != resource.RLIM_INFINITY and soft > old[1]:
        soft = old[1]
        budget = min(restore_mod.MAX_IDLE_DIR_FDS, soft // 4)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, old[1]))
    try:
        assert restore_mod._dir_fd_budget() == budget
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


def test_the_agent_raises_its_descriptor_limit() -> None:
    """A soft limit of 512 (the hard one higher) is raised at start, to the hard limit or 65536."""
    code = (
        "import resource; from agent.main import raise_fd_limit; "
        "print(raise_fd_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    assert want > 512, "the hard limit leaves nothing to raise here"
    out = subprocess.run(
        ["sh", "-c", 'ulimit -S -n 512 && exec "$0" -c "$1"', sys.executable, code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    ).stdout.split()
    assert out == [str(want), str(want)]
