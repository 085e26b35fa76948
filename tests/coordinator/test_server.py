"""The coordinator's gRPC services over real mutual TLS on loopback (protocol v1, design.md §Protocol v1)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
import grpc
import pytest

from coordinator.cli.certs import create_dev_pki
from coordinator.config import CoordinatorConfig, load_config
from coordinator.main import open_store
from coordinator.server import build_server, stop_server
from core import format, tls, wire
from core.tls import TlsFiles
from protos.clawback.v1 import admin_pb2, admin_pb2_grpc, agent_pb2, agent_pb2_grpc, common_pb2

KEY_CHECK = bytes(range(16))
CAPS = ["backup.volume.v1", "restore.v1", "cut.v1"]
TIMEOUT = 10
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Env:
    config: CoordinatorConfig
    store: Any
    server: grpc.aio.Server
    port: int
    certs: dict[str, TlsFiles]
    channels: list[grpc.aio.Channel]

    def channel(self, who: str, options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
        ch = grpc.aio.secure_channel(
            f"127.0.0.1:{self.port}",
            tls.channel_credentials(self.certs[who]),
            options=options or wire.CHANNEL_OPTIONS,
        )
        self.channels.append(ch)
        return ch

    def agent(self, who: str = "node1") -> agent_pb2_grpc.AgentServiceStub:
        return agent_pb2_grpc.AgentServiceStub(self.channel(who))

    def admin(self, who: str = "ops") -> admin_pb2_grpc.AdminServiceStub:
        return admin_pb2_grpc.AdminServiceStub(self.channel(who))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    pki = create_dev_pki(tmp_path / "pki", agents=["node1", "node2"], admins=["ops"], days=1)
    other = create_dev_pki(tmp_path / "other-pki", agents=["node1"], days=1)  # some other CA
    server_tls = pki["coordinator"]
    certs = {
        "node1": pki["agents"]["node1"],
        "node2": pki["agents"]["node2"],
        "ops": pki["admins"]["ops"],
        "stranger": other["agents"]["node1"],
    }
    cfg_file = tmp_path / "coordinator.toml"
    cfg_file.write_text(
        f"""
[coordinator]
listen = "127.0.0.1:0"
data_dir = "data"
heartbeat_interval_s = 5

[repository]
pack_size_mib = 1

[tls]
ca = "{server_tls.ca}"
cert = "{server_tls.cert}"
key = "{server_tls.key}"
"""
    )
    config = load_config(cfg_file)
    store = await asyncio.to_thread(open_store, config)
    await asyncio.to_thread(store.recover)
    server = build_server(config, store)
    await server.start()
    e = Env(config, store, server, server.clawback_port, certs, [])
    try:
        yield e
    finally:
        for ch in e.channels:
            await ch.close()
        await stop_server(server, 1)
        store.catalog.close()


async def init_repo(env: Env) -> common_pb2.RepoConfig:
    return await env.admin().InitRepository(
        admin_pb2.InitRepositoryRequest(key_check=KEY_CHECK), timeout=TIMEOUT
    )


def hello(
    key_check: bytes = KEY_CHECK, sources: tuple[str, ...] = ("data",)
) -> agent_pb2.AgentMessage:
    return agent_pb2.AgentMessage(
        hello=agent_pb2.Hello(
            protocol_version=1,
            agent_version="test",
            capabilities=CAPS,
            hostname="host1",
            key_check=key_check,
            sources=[
                common_pb2.SourceSpec(
                    name=s, kind=common_pb2.SOURCE_KIND_VOLUME, path=f"/srv/{s}", driver="none"
                )
                for s in sources
            ],
        )
    )


async def connect(env: Env, who: str = "node1") -> tuple[Any, agent_pb2.Welcome]:
    """Open a control stream, send Hello and return (call, Welcome)."""
    call = env.agent(who).Control()
    await call.write(hello())
    msg = await asyncio.wait_for(call.read(), TIMEOUT)
    assert msg.WhichOneof("msg") == "welcome"
    return call, msg.welcome


async def expect_code(coro: Any, code: grpc.StatusCode, text: str = "") -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(coro, TIMEOUT)
    assert info.value.code() == code, info.value.details()
    assert text in (info.value.details() or ""), info.value.details()
    return info.value


KEY = common_pb2.WrappedKey(key_id=b"k" * 16, provider="file")


def blob(seed: int, size: int = 2000) -> tuple[bytes, bytes]:
    """A fake sealed blob: random but for the clear key id in its envelope header."""
    header = bytes([1, 0, 1, 1]) + KEY.key_id
    envelope = header + blake3.blake3(seed.to_bytes(8, "little")).digest(length=size - 20)
    return blake3.blake3(b"id" + envelope).digest(), envelope


async def upload(env: Env, blobs: list[tuple[bytes, bytes]], who: str = "node1") -> Any:
    async def reqs() -> AsyncIterator[agent_pb2.UploadRequest]:
        for i, e in blobs:
            yield agent_pb2.UploadRequest(
                blobs=[agent_pb2.BlobData(id=i, type=common_pb2.BLOB_TYPE_DATA, envelope=e)]
            )

    return await env.agent(who).UploadBlobs(reqs(), timeout=TIMEOUT)


async def commit(env: Env, info: common_pb2.SnapshotInfo, refs: list[bytes]) -> Any:
    async def reqs() -> AsyncIterator[agent_pb2.CommitRequest]:
        yield agent_pb2.CommitRequest(header=info)
        yield agent_pb2.CommitRequest(refs=wire.pack_ids(refs))

    return await env.agent().CommitSnapshot(reqs(), timeout=TIMEOUT)


async def stored_snapshot(env: Env) -> tuple[common_pb2.SnapshotInfo, list[bytes]]:
    blobs = [blob(i) for i in range(3)]
    await upload(env, blobs)
    ids = [i for i, _ in blobs]
    await env.agent().PutKeys(agent_pb2.PutKeysRequest(keys=[KEY]), timeout=TIMEOUT)
    info = common_pb2.SnapshotInfo(id=os.urandom(16).hex(), source="data", root=ids[0])
    await commit(env, info, ids)
    return info, ids


# -- control stream ---------------------------------------------------------------


async def test_hello_welcome(env: Env) -> None:
    repo = await init_repo(env)
    call, welcome = await connect(env)
    assert welcome.agent == "node1"
    assert welcome.protocol_version == 1
    assert sorted(welcome.capabilities) == ["backup.volume.v1", "restore.v1"]
    assert welcome.repo.repo_id == repo.repo_id
    assert welcome.repo.key_check == KEY_CHECK
    # the default chunker, fastcdc-256k
    assert (welcome.repo.chunk_min, welcome.repo.chunk_max) == (64 * 1024, 1024 * 1024)
    assert welcome.repo.max_message_size == 24 * 1024 * 1024
    assert welcome.heartbeat_interval_s == 5

    agents = (await env.admin().ListAgents(admin_pb2.ListAgentsRequest(), timeout=TIMEOUT)).agents
    [a] = agents
    assert (a.name, a.connected, a.hostname) == ("node1", True, "host1")
    assert [s.name for s in a.sources] == ["data"]
    await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_ns=1)))

    await call.done_writing()
    for _ in range(50):
        agents = (await env.admin().ListAgents(admin_pb2.ListAgentsRequest())).agents
        if not agents[0].connected:
            break
        await asyncio.sleep(0.05)
    assert not agents[0].connected


async def test_first_message_must_be_hello(env: Env) -> None:
    await init_repo(env)
    call = env.agent().Control()
    await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat()))
    await expect_code(call.read(), grpc.StatusCode.INVALID_ARGUMENT, "must be Hello")


async def test_wrong_key_check_refused(env: Env) -> None:
    await init_repo(env)
    call = env.agent().Control()
    await call.write(hello(key_check=b"\x00" * 16))
    await expect_code(
        call.read(),
        grpc.StatusCode.FAILED_PRECONDITION,
        "agent node1 holds a key that does not belong to this repository",
    )


async def test_no_repository(env: Env) -> None:
    call = env.agent().Control()
    await call.write(hello())
    await expect_code(
        call.read(), grpc.StatusCode.FAILED_PRECONDITION, "no repository: run `clawback repo init`"
    )


async def test_newer_stream_replaces_older(env: Env) -> None:
    await init_repo(env)
    old, _ = await connect(env)
    new, _ = await connect(env)
    await expect_code(old.read(), grpc.StatusCode.ABORTED, "connected again")
    jobs = await env.admin().StartBackup(admin_pb2.StartBackupRequest(agent="node1"))
    msg = await asyncio.wait_for(new.read(), TIMEOUT)
    assert msg.command.job_id == jobs.jobs[0].id


# -- identity ---------------------------------------------------------------------


async def test_untrusted_ca_refused_at_tls(env: Env) -> None:
    stub = env.agent("stranger")
    await expect_code(
        stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"")), grpc.StatusCode.UNAVAILABLE
    )


async def test_agent_cert_cannot_use_admin_service(env: Env) -> None:
    stub = admin_pb2_grpc.AdminServiceStub(env.channel("node1"))
    await expect_code(
        stub.GetRepository(admin_pb2.GetRepositoryRequest()),
        grpc.StatusCode.PERMISSION_DENIED,
        "needs 'admin'",
    )
    await expect_code(
        stub.InitRepository(admin_pb2.InitRepositoryRequest(key_check=KEY_CHECK)),
        grpc.StatusCode.PERMISSION_DENIED,
    )
    await expect_code(
        stub.UpdateRepository(admin_pb2.UpdateRepositoryRequest(compression="zstd-3")),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_admin_cert_cannot_use_agent_service(env: Env) -> None:
    stub = agent_pb2_grpc.AgentServiceStub(env.channel("ops"))
    await expect_code(
        stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"")),
        grpc.StatusCode.PERMISSION_DENIED,
        "needs 'agent'",
    )


async def test_revoked_agent_refused(env: Env) -> None:
    await init_repo(env)
    call, _ = await connect(env)
    info = await env.admin().RevokeAgent(admin_pb2.RevokeAgentRequest(name="node1"))
    assert info.revoked and not info.connected
    # The open stream is cut, and every later call is refused.
    await expect_code(call.read(), grpc.StatusCode.PERMISSION_DENIED, "revoked")
    await expect_code(
        env.agent().MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"")),
        grpc.StatusCode.PERMISSION_DENIED,
        "agent node1 is revoked",
    )
    again = env.agent().Control()
    await again.write(hello())
    await expect_code(again.read(), grpc.StatusCode.PERMISSION_DENIED, "revoked")
    await expect_code(
        env.admin().RevokeAgent(admin_pb2.RevokeAgentRequest(name="nobody")),
        grpc.StatusCode.NOT_FOUND,
    )


# -- blob traffic -------------------------------------------------------------------


async def test_oversized_message_refused(env: Env) -> None:
    big = 25 * 1024 * 1024
    ch = env.channel("node1", [("grpc.max_send_message_length", 2 * big)])
    stub = agent_pb2_grpc.AgentServiceStub(ch)
    await expect_code(
        stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"\x00" * big)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    )


async def test_malformed_id_list(env: Env) -> None:
    stub = env.agent()
    await expect_code(
        stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"\x01" * 33)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a multiple of 32",
    )
    await expect_code(
        stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=b"\x01" * 32 * 65537)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit",
    )
    await expect_code(
        upload(env, [(b"\x01" * 31, b"x" * 100)]), grpc.StatusCode.INVALID_ARGUMENT, "blob id"
    )


async def test_upload_missing_commit_round_trip(env: Env) -> None:
    await init_repo(env)
    stub = env.agent()
    blobs = [blob(i) for i in range(5)]
    ids = [i for i, _ in blobs]
    resp = await stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=wire.pack_ids(ids)))
    assert wire.read_bitmap(resp.missing, 5) == [True] * 5

    up = await upload(env, blobs[:3])
    assert (up.blobs_stored, up.blobs_duplicate, up.packs_written) == (3, 0, 1)
    assert up.bytes_stored == 3 * 2000
    resp = await stub.MissingBlobs(agent_pb2.MissingBlobsRequest(ids=wire.pack_ids(ids)))
    assert wire.read_bitmap(resp.missing, 5) == [False, False, False, True, True]

    up = await upload(env, blobs)
    assert (up.blobs_stored, up.blobs_duplicate) == (2, 3)
    empty = await upload(env, [])
    assert empty.blobs_stored == 0

    key = common_pb2.WrappedKey(key_id=b"k" * 16, provider="file")
    await stub.PutKeys(agent_pb2.PutKeysRequest(keys=[key]))
    info = common_pb2.SnapshotInfo(
        id="ab" * 16, agent="mallory", source="data", root=ids[0], key_ids=[b"k" * 16]
    )
    res = await commit(env, info, ids)
    assert (res.snapshot_id, res.already_committed) == ("ab" * 16, False)
    res = await commit(env, info, ids)
    assert res.already_committed

    admin = env.admin()
    got = await admin.GetSnapshot(admin_pb2.GetSnapshotRequest(snapshot_id="abab"))
    assert got.agent == "node1"  # the server sets it from the certificate
    assert got.root == ids[0]
    listed = await admin.ListSnapshots(admin_pb2.ListSnapshotsRequest(agent="node1"))
    assert [s.id for s in listed.snapshots] == ["ab" * 16]

    # Admin reads any blob; keys by id.
    out = []
    async for r in admin.ReadBlobs(admin_pb2.ReadBlobsRequest(ids=wire.pack_ids(ids[:2]))):
        out.extend(r.blobs)
    assert {(b.id, b.envelope) for b in out} == set(blobs[:2])
    keys = await admin.GetKeys(agent_pb2.GetKeysRequest(key_ids=[b"k" * 16, b"z" * 16]))
    assert [k.key_id for k in keys.keys] == [b"k" * 16]

    events = [e async for e in admin.Check(admin_pb2.CheckRequest(read_data=True))]
    assert events[-1].kind == admin_pb2.CheckEvent.KIND_SUMMARY
    assert events[-1].errors == 0


async def test_commit_with_missing_ref_refused(env: Env) -> None:
    await init_repo(env)
    blobs = [blob(i) for i in range(2)]
    await upload(env, blobs[:1])
    ids = [i for i, _ in blobs]
    info = common_pb2.SnapshotInfo(id="cd" * 16, source="data", root=ids[0])
    await expect_code(
        commit(env, info, ids), grpc.StatusCode.FAILED_PRECONDITION, "1 referenced blobs"
    )
    await expect_code(
        env.admin().GetSnapshot(admin_pb2.GetSnapshotRequest(snapshot_id="cd" * 16)),
        grpc.StatusCode.NOT_FOUND,
    )

    async def refs_first() -> AsyncIterator[agent_pb2.CommitRequest]:
        yield agent_pb2.CommitRequest(refs=ids[0])

    await expect_code(
        env.agent().CommitSnapshot(refs_first()), grpc.StatusCode.INVALID_ARGUMENT, "header"
    )


# -- jobs ---------------------------------------------------------------------------


async def test_backup_job_drives_watch_to_terminal(env: Env) -> None:
    await init_repo(env)
    admin = env.admin()
    await expect_code(
        admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1")),
        grpc.StatusCode.UNAVAILABLE,
        "agent node1 is not connected",
    )
    call, _ = await connect(env)
    await expect_code(
        admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1", sources=["nope"])),
        grpc.StatusCode.NOT_FOUND,
        "no source 'nope'",
    )
    started = await admin.StartBackup(
        admin_pb2.StartBackupRequest(agent="node1", sources=["data"], tags=["t"])
    )
    [job] = started.jobs
    assert (job.agent, job.source, job.state) == ("node1", "data", common_pb2.JOB_STATE_PENDING)
    assert job.kind == common_pb2.JOB_KIND_BACKUP

    msg = await asyncio.wait_for(call.read(), TIMEOUT)
    cmd = msg.command
    assert cmd.job_id == job.id
    assert (cmd.backup.source, cmd.backup.parent, list(cmd.backup.tags)) == ("data", "", ["t"])

    states: list[int] = []

    async def watch() -> None:
        async for info in admin.WatchJob(admin_pb2.GetJobRequest(job_id=job.id)):
            states.append(info.state)

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    # Another agent cannot drive this job.
    other, _ = await connect(env, "node2")
    await other.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(job_id=job.id, state=common_pb2.JOB_STATE_FAILED)
        )
    )
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(
                job_id=job.id,
                state=common_pb2.JOB_STATE_RUNNING,
                progress=common_pb2.Progress(files_done=3),
            )
        )
    )
    await asyncio.sleep(0.2)
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(
                job_id=job.id, state=common_pb2.JOB_STATE_SUCCEEDED, snapshot_id="ef" * 16
            )
        )
    )
    await asyncio.wait_for(watcher, TIMEOUT)
    assert states[0] == common_pb2.JOB_STATE_PENDING
    assert states[-1] == common_pb2.JOB_STATE_SUCCEEDED
    assert common_pb2.JOB_STATE_FAILED not in states

    # Terminal states are final.
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(job_id=job.id, state=common_pb2.JOB_STATE_RUNNING)
        )
    )
    await asyncio.sleep(0.1)
    got = await admin.GetJob(admin_pb2.GetJobRequest(job_id=job.id))
    assert got.state == common_pb2.JOB_STATE_SUCCEEDED and got.snapshot_id == "ef" * 16
    listed = await admin.ListJobs(admin_pb2.ListJobsRequest(agent="node1"))
    assert [j.id for j in listed.jobs] == [job.id]
    await expect_code(
        admin.GetJob(admin_pb2.GetJobRequest(job_id="nope")), grpc.StatusCode.NOT_FOUND
    )


async def test_disconnect_fails_running_jobs(env: Env) -> None:
    await init_repo(env)
    call, _ = await connect(env)
    started = await env.admin().StartBackup(admin_pb2.StartBackupRequest(agent="node1"))
    job_id = started.jobs[0].id
    call.cancel()
    for _ in range(100):
        got = await env.admin().GetJob(admin_pb2.GetJobRequest(job_id=job_id))
        if got.state == common_pb2.JOB_STATE_FAILED:
            break
        await asyncio.sleep(0.05)
    assert got.state == common_pb2.JOB_STATE_FAILED
    assert got.error == "agent disconnected"


async def test_download_needs_restore_job(env: Env) -> None:
    await init_repo(env)
    info, ids = await stored_snapshot(env)
    stub = env.agent()

    async def download(job_id: str, want: list[bytes], who: str = "node1") -> list[Any]:
        out = []
        async for r in env.agent(who).DownloadBlobs(
            agent_pb2.DownloadRequest(job_id=job_id, ids=wire.pack_ids(want)), timeout=TIMEOUT
        ):
            out.extend(r.blobs)
        return out

    await expect_code(download("", ids), grpc.StatusCode.PERMISSION_DENIED, "no active restore")
    await expect_code(
        stub.GetKeys(agent_pb2.GetKeysRequest(job_id="x", key_ids=[b"k" * 16])),
        grpc.StatusCode.PERMISSION_DENIED,
    )

    # A restore job for node2 (an operator may restore onto another node).
    call, _ = await connect(env, "node2")
    admin = env.admin()
    await expect_code(
        admin.StartRestore(
            admin_pb2.StartRestoreRequest(snapshot_id=info.id[:8], agent="node2", target="rel")
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "absolute",
    )
    job = await admin.StartRestore(
        admin_pb2.StartRestoreRequest(snapshot_id=info.id[:8], agent="node2", target="/restore")
    )
    assert job.kind == common_pb2.JOB_KIND_RESTORE and job.snapshot_id == info.id
    cmd = (await asyncio.wait_for(call.read(), TIMEOUT)).command
    assert cmd.restore.snapshot.id == info.id and cmd.restore.target == "/restore"

    got = await download(job.id, ids, "node2")
    assert {b.id for b in got} == set(ids) and all(b.envelope for b in got)
    # Not for another agent, and not for blobs outside the snapshot.
    await expect_code(download(job.id, ids, "node1"), grpc.StatusCode.PERMISSION_DENIED)
    await expect_code(
        download(job.id, [blob(99)[0]], "node2"),
        grpc.StatusCode.PERMISSION_DENIED,
        "not referenced",
    )
    keys = await env.agent("node2").GetKeys(agent_pb2.GetKeysRequest(job_id=job.id, key_ids=[]))
    assert list(keys.keys) == []


# -- the daemon -----------------------------------------------------------------------


async def _start_daemon(config: Path) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.main",
        "--config",
        str(config),
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    while True:
        line = (await asyncio.wait_for(proc.stderr.readline(), TIMEOUT)).decode()
        assert line, "coordinator exited before listening"
        if m := re.fullmatch(r"coordinator listening on 127\.0\.0\.1:(\d+)\n", line):
            return proc, int(m.group(1))


async def test_daemon_serves_and_stops(tmp_path: Path) -> None:
    pki = create_dev_pki(tmp_path / "pki", admins=["ops"], days=1)
    server_tls, admin_tls = pki["coordinator"], pki["admins"]["ops"]
    body = (
        '[coordinator]\ndata_dir = "data"\nlisten = "127.0.0.1:{port}"\n'
        f'[tls]\nca = "{server_tls.ca}"\ncert = "{server_tls.cert}"\nkey = "{server_tls.key}"\n'
    )
    cfg = tmp_path / "coordinator.toml"
    cfg.write_text(body.format(port=0))
    proc, port = await _start_daemon(cfg)
    try:
        async with grpc.aio.secure_channel(
            f"127.0.0.1:{port}", tls.channel_credentials(admin_tls), options=wire.CHANNEL_OPTIONS
        ) as ch:
            stub = admin_pb2_grpc.AdminServiceStub(ch)
            await expect_code(
                stub.GetRepository(admin_pb2.GetRepositoryRequest()),
                grpc.StatusCode.FAILED_PRECONDITION,
                "no repository",
            )
        # A second coordinator on the same port fails before touching the repository.
        busy = tmp_path / "busy.toml"
        busy.write_text(body.format(port=port).replace('"data"', '"data2"'))
        second = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "coordinator.main",
            "--config",
            str(busy),
            cwd=REPO_ROOT,
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(second.communicate(), TIMEOUT)
        assert second.returncode == 1
        assert b"already in use" in err
    finally:
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, rest


async def test_daemon_config_error_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[coordinator]\ndata_dir = "d"\nbogus = 1\n')
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coordinator.main",
        "--config",
        str(cfg),
        cwd=REPO_ROOT,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    assert proc.returncode == 2
    assert err.decode() == f"clawback-coordinator: {cfg}: coordinator.bogus: unknown key\n"


async def test_failed_upload_discards_open_pack(env: Env) -> None:
    good = blob(7)

    async def reqs() -> AsyncIterator[agent_pb2.UploadRequest]:
        yield agent_pb2.UploadRequest(
            blobs=[agent_pb2.BlobData(id=good[0], type=common_pb2.BLOB_TYPE_DATA, envelope=good[1])]
        )
        yield agent_pb2.UploadRequest(
            blobs=[agent_pb2.BlobData(id=b"\x02" * 32, type=9, envelope=b"x" * 100)]
        )

    await expect_code(
        env.agent().UploadBlobs(reqs()), grpc.StatusCode.INVALID_ARGUMENT, "invalid blob type"
    )
    resp = await env.agent().MissingBlobs(agent_pb2.MissingBlobsRequest(ids=good[0]))
    assert wire.read_bitmap(resp.missing, 1) == [True]


async def test_large_and_small_blobs_are_stored_byte_for_byte(env: Env) -> None:
    """Messages of large blobs are read from their wire bytes (wire.parse_upload), messages of
    small ones from the parsed message (by mean size): both must store exactly the envelopes
    sent, messages that mix the two sizes too."""
    await init_repo(env)
    big = [blob(100 + i, 300_000) for i in range(3)]
    small = [blob(200 + i, 600) for i in range(40)]
    large_first = [blob(300, 40_000)] + [blob(301 + i, 700) for i in range(5)]
    small_first = [blob(400, 500)] + [blob(401 + i, 40_000) for i in range(3)]
    groups = (big, small, large_first, small_first)

    async def reqs() -> AsyncIterator[agent_pb2.UploadRequest]:
        for group in groups:
            yield agent_pb2.UploadRequest(
                blobs=[
                    agent_pb2.BlobData(id=i, type=common_pb2.BLOB_TYPE_DATA, envelope=e)
                    for i, e in group
                ]
            )

    up = await env.agent().UploadBlobs(reqs(), timeout=TIMEOUT)
    sent = [b for group in groups for b in group]
    assert up.blobs_stored == len(sent) == 53
    assert up.bytes_stored == sum(len(e) for _, e in sent)
    got = {i: e for i, _, e, _ in env.store.read_blobs([i for i, _ in sent])}
    assert got == dict(sent)


async def test_malformed_upload_message_is_refused(env: Env) -> None:
    await init_repo(env)
    good = blob(8)
    method = env.channel("node1").stream_unary(
        "/clawback.v1.AgentService/UploadBlobs",
        request_serializer=lambda b: b,
        response_deserializer=agent_pb2.UploadResponse.FromString,
    )

    async def reqs() -> AsyncIterator[bytes]:
        yield agent_pb2.UploadRequest(
            blobs=[agent_pb2.BlobData(id=good[0], type=common_pb2.BLOB_TYPE_DATA, envelope=good[1])]
        ).SerializeToString()
        yield b"\x12\xff\xff\x03" + b"x" * 10  # a blob field claiming 65 KiB, 10 bytes given

    await expect_code(method(reqs()), grpc.StatusCode.INVALID_ARGUMENT, "malformed UploadRequest")
    resp = await env.agent().MissingBlobs(agent_pb2.MissingBlobsRequest(ids=good[0]))
    assert wire.read_bitmap(resp.missing, 1) == [True]  # the open pack was discarded


async def test_the_heap_is_trimmed_when_the_last_blob_stream_closes(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    from coordinator import server as server_mod

    trims: list[int] = []
    real = server_mod.trim_malloc

    def counting() -> bool:  # the real trim, counted
        trims.append(1)
        return real()

    monkeypatch.setattr(server_mod, "trim_malloc", counting)
    await init_repo(env)
    await upload(env, [blob(i) for i in range(3)])
    for _ in range(100):  # the trim runs in an executor thread after the response
        if trims:
            break
        await asyncio.sleep(0.01)
    assert trims == [1]
    # Two streams at once: one trim, when both have closed.
    trims.clear()
    await asyncio.gather(upload(env, [blob(10)]), upload(env, [blob(11)], who="node1"))
    await asyncio.sleep(0.2)
    assert 1 <= len(trims) <= 2


async def test_new_repositories_cut_database_files_on_a_fixed_grid(env: Env) -> None:
    cfg = await init_repo(env)
    assert cfg.paged_chunker == "fixed-64k" and cfg.paged_chunk_max == 64 * 1024
    assert list(cfg.paged_files) == list(format.DEFAULT_PAGED_FILES)
    assert list(cfg.paged_formats) == ["sqlite3", "bbolt"]
    # Stored, and sent to agents as it is.
    again = await env.admin().GetRepository(admin_pb2.GetRepositoryRequest())
    assert again.paged_chunker == "fixed-64k" and again.paged_files == cfg.paged_files
    stored = env.store.config()
    assert stored.paged_chunker == "fixed-64k"
    assert stored.paged_files == format.DEFAULT_PAGED_FILES
    assert stored.paged_formats == format.DEFAULT_PAGED_FORMATS


@pytest.mark.parametrize(
    ("request_fields", "paged_chunker", "paged_files", "paged_formats"),
    [
        ({"paged_chunker": "none"}, "", [], []),
        (
            {"paged_files": ["*.pg", "*/data/base/*"]},
            "fixed-64k",
            ["*.pg", "*/data/base/*"],
            ["sqlite3", "bbolt"],
        ),
        ({"paged_formats": ["none"]}, "fixed-64k", list(format.DEFAULT_PAGED_FILES), []),
        ({"paged_formats": ["bbolt"]}, "fixed-64k", list(format.DEFAULT_PAGED_FILES), ["bbolt"]),
    ],
)
async def test_paged_files_chosen_at_init(
    env: Env,
    request_fields: dict[str, Any],
    paged_chunker: str,
    paged_files: list[str],
    paged_formats: list[str],
) -> None:
    cfg = await env.admin().InitRepository(
        admin_pb2.InitRepositoryRequest(key_check=KEY_CHECK, **request_fields), timeout=TIMEOUT
    )
    assert (cfg.paged_chunker, list(cfg.paged_files), list(cfg.paged_formats)) == (
        paged_chunker,
        paged_files,
        paged_formats,
    )


@pytest.mark.parametrize(
    ("request_fields", "says"),
    [
        ({"paged_chunker": "fixed-3k"}, "unknown chunker 'fixed-3k'"),
        ({"paged_files": ["*.db", " "]}, "is empty"),
        ({"paged_files": ["x" * 300]}, "at most 255 characters"),
        ({"paged_chunker": "none", "paged_files": ["*.db"]}, "and it is none"),
        ({"paged_chunker": "none", "paged_formats": ["sqlite3"]}, "and it is none"),
        ({"paged_formats": ["lmdb"]}, "unknown paged format 'lmdb' (known: bbolt, sqlite3)"),
        ({"paged_formats": ["sqlite3", "sqlite3"]}, "named twice"),
        ({"paged_formats": ["none", "sqlite3"]}, "unknown paged format 'none'"),
    ],
)
async def test_bad_paged_files_refused_and_nothing_initialised(
    env: Env, request_fields: dict[str, Any], says: str
) -> None:
    await expect_code(
        env.admin().InitRepository(
            admin_pb2.InitRepositoryRequest(key_check=KEY_CHECK, **request_fields)
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        says,
    )
    await expect_code(
        env.admin().GetRepository(admin_pb2.GetRepositoryRequest()),
        grpc.StatusCode.FAILED_PRECONDITION,
    )


# -- changing the repository config ---------------------------------------------------------


async def test_update_repository_changes_what_may_change(env: Env) -> None:
    cfg = await init_repo(env)
    before = env.store.config()
    admin = env.admin()
    got = await admin.UpdateRepository(
        admin_pb2.UpdateRepositoryRequest(compression="zstd-3", paged_files=["*.pg"]),
        timeout=TIMEOUT,
    )
    assert (got.compression, got.paged_chunker, list(got.paged_files)) == (
        "zstd-3",
        "fixed-64k",
        ["*.pg"],
    )
    # Written to the repository as a whole config, everything else as it was.
    stored = format.RepoConfig.from_json(env.store.backend.get("config"))
    assert stored == dataclasses.replace(before, compression="zstd-3", paged_files=("*.pg",))
    assert (got.repo_id, got.key_check, got.chunker) == (cfg.repo_id, cfg.key_check, cfg.chunker)
    again = await admin.GetRepository(admin_pb2.GetRepositoryRequest())
    assert again == got
    # No paged files, then the grid again with the default patterns.
    got = await admin.UpdateRepository(admin_pb2.UpdateRepositoryRequest(paged_chunker="none"))
    assert (got.paged_chunker, list(got.paged_files), got.compression) == ("", [], "zstd-3")
    got = await admin.UpdateRepository(admin_pb2.UpdateRepositoryRequest(paged_chunker="fixed-64k"))
    assert list(got.paged_files) == list(format.DEFAULT_PAGED_FILES)
    assert list(got.paged_formats) == list(format.DEFAULT_PAGED_FORMATS)
    assert format.RepoConfig.from_json(env.store.backend.get("config")).paged_chunker == (
        "fixed-64k"
    )
    # Formats alone: replaced, the patterns kept; none.
    got = await admin.UpdateRepository(admin_pb2.UpdateRepositoryRequest(paged_formats=["bbolt"]))
    assert (list(got.paged_files), list(got.paged_formats)) == (
        list(format.DEFAULT_PAGED_FILES),
        ["bbolt"],
    )
    got = await admin.UpdateRepository(admin_pb2.UpdateRepositoryRequest(paged_formats=["none"]))
    assert list(got.paged_formats) == [] and got.paged_chunker == "fixed-64k"
    assert format.RepoConfig.from_json(env.store.backend.get("config")).paged_formats == ()


async def test_backups_started_after_an_update_carry_the_new_config(env: Env) -> None:
    cfg = await init_repo(env)
    call, welcome = await connect(env)
    assert welcome.repo.compression == cfg.compression == "zstd-1"
    admin = env.admin()
    await admin.UpdateRepository(
        admin_pb2.UpdateRepositoryRequest(compression="zstd-3", paged_chunker="none")
    )
    await admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1", sources=["data"]))
    msg = await asyncio.wait_for(call.read(), TIMEOUT)
    repo = msg.command.backup.repo
    assert (repo.repo_id, repo.compression, repo.paged_chunker) == (cfg.repo_id, "zstd-3", "")
    assert wire.repo_config_from_wire(repo) == dataclasses.replace(
        wire.repo_config_from_wire(welcome.repo),
        compression="zstd-3",
        paged_chunker="",
        paged_files=(),
        paged_formats=(),
    )
    call.cancel()


@pytest.mark.parametrize(
    ("request_fields", "says"),
    [
        ({}, "nothing to change"),
        ({"compression": "lz4"}, "unknown compression 'lz4'"),
        ({"paged_chunker": "fixed-3k"}, "unknown chunker 'fixed-3k'"),
        ({"paged_files": ["*.db", " "]}, "is empty"),
        ({"paged_chunker": "none", "paged_files": ["*.db"]}, "and it is none"),
        ({"compression": "zstd-3", "paged_files": ["x" * 300]}, "at most 255 characters"),
        ({"paged_formats": ["lmdb"]}, "unknown paged format 'lmdb'"),
        ({"paged_chunker": "none", "paged_formats": ["sqlite3"]}, "and it is none"),
    ],
)
async def test_bad_updates_refused_and_the_config_kept(
    env: Env, request_fields: dict[str, Any], says: str
) -> None:
    await init_repo(env)
    kept = env.store.backend.get("config")
    await expect_code(
        env.admin().UpdateRepository(admin_pb2.UpdateRepositoryRequest(**request_fields)),
        grpc.StatusCode.INVALID_ARGUMENT,
        says,
    )
    assert env.store.backend.get("config") == kept
    assert env.store.config() == format.RepoConfig.from_json(kept)


async def test_patterns_alone_need_a_paged_chunker_and_a_repository(env: Env) -> None:
    update = admin_pb2.UpdateRepositoryRequest(paged_files=["*.pg"])
    await expect_code(
        env.admin().UpdateRepository(update), grpc.StatusCode.FAILED_PRECONDITION, "repo init"
    )
    await env.admin().InitRepository(
        admin_pb2.InitRepositoryRequest(key_check=KEY_CHECK, paged_chunker="none")
    )
    kept = env.store.backend.get("config")
    for alone in (update, admin_pb2.UpdateRepositoryRequest(paged_formats=["sqlite3"])):
        await expect_code(
            env.admin().UpdateRepository(alone),
            grpc.StatusCode.INVALID_ARGUMENT,
            "cuts no files on a grid: name the paged chunker (fixed-64k)",
        )
    assert env.store.backend.get("config") == kept


async def test_cancel_job_reaches_the_agent_and_its_update_ends_the_job(env: Env) -> None:
    await init_repo(env)
    call, _ = await connect(env)
    admin = env.admin()
    [job] = (await admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1"))).jobs
    assert (await asyncio.wait_for(call.read(), TIMEOUT)).command.WhichOneof("cmd") == "backup"
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(job_id=job.id, state=common_pb2.JOB_STATE_RUNNING)
        )
    )
    got = await admin.CancelJob(admin_pb2.CancelJobRequest(job_id=job.id[:8]), timeout=TIMEOUT)
    assert got.id == job.id and got.state in (
        common_pb2.JOB_STATE_PENDING,
        common_pb2.JOB_STATE_RUNNING,
    )
    msg = await asyncio.wait_for(call.read(), TIMEOUT)
    assert (msg.command.job_id, msg.command.WhichOneof("cmd")) == (job.id, "cancel")
    # Asking does not end it: the agent's answer does.
    still = await admin.GetJob(admin_pb2.GetJobRequest(job_id=job.id))
    assert still.state != common_pb2.JOB_STATE_CANCELLED
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(
                job_id=job.id, state=common_pb2.JOB_STATE_CANCELLED, error="cancelled"
            )
        )
    )
    for _ in range(100):
        got = await admin.GetJob(admin_pb2.GetJobRequest(job_id=job.id))
        if got.state == common_pb2.JOB_STATE_CANCELLED:
            break
        await asyncio.sleep(0.02)
    assert got.state == common_pb2.JOB_STATE_CANCELLED
    # An ended job is returned as it is, and nothing more is sent.
    again = await admin.CancelJob(admin_pb2.CancelJobRequest(job_id=job.id))
    assert again.state == common_pb2.JOB_STATE_CANCELLED
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call.read(), 0.3)
    call.cancel()


async def test_cancel_job_refusals(env: Env) -> None:
    await init_repo(env)
    await expect_code(
        env.admin().CancelJob(admin_pb2.CancelJobRequest(job_id="ffffffff")),
        grpc.StatusCode.NOT_FOUND,
    )
    await expect_code(
        env.admin().CancelJob(admin_pb2.CancelJobRequest(job_id="")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "empty job id",
    )
    await expect_code(
        admin_pb2_grpc.AdminServiceStub(env.channel("node1")).CancelJob(
            admin_pb2.CancelJobRequest(job_id="ffffffff")
        ),
        grpc.StatusCode.PERMISSION_DENIED,
    )


async def test_an_agent_that_falls_silent_is_disconnected_and_its_jobs_fail(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """design.md §Control stream: three silent heartbeat intervals end the stream. A node that
    dies without closing its connection (power loss, a cut link) looks like this. The
    interval here is 5 s; the number of intervals is shortened to keep the test short."""
    from coordinator import server as server_mod

    monkeypatch.setattr(server_mod, "SILENT_INTERVALS", 0.2)  # 1 s of silence
    await init_repo(env)
    admin = env.admin()
    # Heartbeats keep a session alive past the silence limit.
    call, _ = await connect(env)
    for _ in range(8):
        await asyncio.sleep(0.25)
        await call.write(agent_pb2.AgentMessage(heartbeat=agent_pb2.Heartbeat(sent_ns=1)))
    listed = (await admin.ListAgents(admin_pb2.ListAgentsRequest())).agents
    assert [a.connected for a in listed if a.name == "node1"] == [True]
    [job] = (await admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1"))).jobs
    assert (await asyncio.wait_for(call.read(), TIMEOUT)).command.job_id == job.id
    await call.write(
        agent_pb2.AgentMessage(
            job_update=agent_pb2.JobUpdate(job_id=job.id, state=common_pb2.JOB_STATE_RUNNING)
        )
    )
    # Then nothing: the coordinator ends the stream, says why, and fails the job.
    await expect_code(call.read(), grpc.StatusCode.UNAVAILABLE, "no heartbeat for 1.0 s")
    got = await admin.GetJob(admin_pb2.GetJobRequest(job_id=job.id))
    for _ in range(50):
        if got.state == common_pb2.JOB_STATE_FAILED:
            break
        await asyncio.sleep(0.05)
        got = await admin.GetJob(admin_pb2.GetJobRequest(job_id=job.id))
    assert (got.state, got.error) == (common_pb2.JOB_STATE_FAILED, "agent disconnected")
    listed = (await admin.ListAgents(admin_pb2.ListAgentsRequest())).agents
    assert [a.connected for a in listed if a.name == "node1"] == [False]
    await expect_code(
        admin.StartBackup(admin_pb2.StartBackupRequest(agent="node1")),
        grpc.StatusCode.UNAVAILABLE,
        "not connected",
    )
