"""The coordinator-scale benchmark: MissingBlobs against a large blob index, and many agents uploading at once.

    python -m bench.scale [--entries 10M] [--agents 50] [--json FILE] [--workdir DIR] [--quick]
                          [--seed 1] [--callers 1,4,16] [--duration 5] [--agent-mib 8]
                          [--present 0.5] [--pool 128] [--keep]

1. **Index.** A catalog whose blob index holds `--entries` synthetic entries:
   the schema comes from the coordinator's own code (`SqliteCatalog` runs its
   migrations), then rows are bulk-inserted in one transaction (journal off,
   the secondary indexes dropped and rebuilt from their own DDL) with plausible packs
   (40 blobs each), offsets, lengths (48 B .. 1.5 MiB), checksums, types (5 %
   trees) and 64 data key ids; `packs` gets a row per pack. Ids are uniformly
   spread random 32-byte values generated in key order (an 8-byte prefix
   `i * 2**64 // N`, then 24 random bytes), so the B-tree is built by appending:
   10M rows take about a minute. The built catalog is cached under
   `WORKDIR/cache/` by entry count, seed and schema version; each run copies it.
2. **Coordinator.** A real `clawback-coordinator` process on that catalog and
   a fresh repository (`deploy.devcluster.DevCluster`: development PKI,
   loopback mTLS, `clawback repo init`). Its RSS is read from
   `/proc/<pid>/status` after start; each phase resets VmHWM (`clear_refs`) and
   reports the phase's peak.
3. **MissingBlobs.** 1 and several concurrent callers, each with its own agent
   certificate and connection, send requests of 4096 ids (the agent's
   `MISSING_BATCH`), `--present` of them indexed and the rest absent, for
   `--duration` seconds each. Every answer is compared with the known truth.
   Besides ids/s, ids per CPU-second of the coordinator: on a shared machine
   the steadier figure of what one free core answers.
4. **Uploads.** `--agents` in-process agents, each with its own certificate
   and connection, first ask MissingBlobs for their ids (all must be missing),
   then, all released at once, stream `--agent-mib` of their own sealed blobs
   (random data, keyed BLAKE3 ids, AES-256-GCM envelopes from the repository's
   key file) through the agent's real upload path (`GrpcRepoClient`,
   2 MiB messages), then ask again (none may be missing). Reported: aggregate
   MB/s, each agent's MB/s (min/median/max; min/median shows whether one
   starves), the coordinator's CPU and peak RSS.
5. **Verification** after the coordinator stops: the catalog holds exactly the
   synthetic entries plus every uploaded blob, each in a pack present in the
   repository and with the data key that sealed it.

The client runs in this process: with few cores it competes with the
coordinator for CPU (its CPU time is reported, and the load average of each
phase). The exit status is non-zero
when any answer is wrong or any upload is incomplete, not when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import re
import resource
import shutil
import sqlite3
import statistics
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.run import host_info, read_stat, reset_hwm

DEFAULT_WORKDIR = Path("/var/tmp/clawback-scale")
DEFAULT_ENTRIES = "10M"
QUICK_ENTRIES = "1M"
BATCH = 4096  # ids per MissingBlobs request: agent/backup.py MISSING_BATCH
QUERY_POOL = 128  # distinct requests per caller count, cycled
BLOCK = 65536  # synthetic entries per generated block
BLOBS_PER_PACK = 40  # ~32 MiB packs of ~0.8 MiB blobs
KEY_IDS = 64  # distinct data keys among the synthetic entries
GENERATOR = 1  # bump when the synthetic rows change: the cache key includes it
TARGET_IDS_PER_S = 200_000
TARGET_RSS = 400 << 20
_META = struct.Struct("<16sHBB")  # checksum, length word, type byte, key byte
_CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1 << 20


def parse_count(text: str) -> int:
    """Entries from `20000`, `20k`, `10M` (decimal units)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)", text.strip().lower())
    if not m:
        raise ValueError(f"count {text!r}: expected a number with an optional k, M or G suffix")
    value = int(float(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2)])
    if value < 1:
        raise ValueError(f"count {text!r} must be at least 1")
    return value


# --------------------------------------------------------------------------- synthetic index


class SyntheticIndex:
    """N deterministic blob-index rows for a seed; any entry's id can be regenerated cheaply."""

    def __init__(self, entries: int, seed: int) -> None:
        self.entries = entries
        self.seed = seed
        self.key_ids = [self._digest(f"key/{i}", 16) for i in range(KEY_IDS)]

    def _digest(self, what: str, size: int) -> bytes:
        return hashlib.blake2b(
            f"clawback-scale/{GENERATOR}/{self.seed}/{what}".encode(), digest_size=size
        ).digest()

    def _random(self, what: str, k: int, nbytes: int) -> bytes:
        return random.Random(f"clawback-scale/{GENERATOR}/{self.seed}/{what}/{k}").randbytes(nbytes)

    def _block_size(self, k: int) -> int:
        return min(BLOCK, self.entries - k * BLOCK)

    def _prefix(self, i: int) -> bytes:
        return ((i << 64) // self.entries).to_bytes(8, "big")

    def block_ids(self, k: int) -> list[bytes]:
        """The ids of entries k*BLOCK .. k*BLOCK+BLOCK-1, in key order."""
        n = self._block_size(k)
        tails = self._random("ids", k, 24 * n)
        base = k * BLOCK
        return [self._prefix(base + j) + tails[24 * j : 24 * j + 24] for j in range(n)]

    def ids_at(self, indices: Sequence[int]) -> list[bytes]:
        """The ids of the given entries, in the given order."""
        by_block: dict[int, list[int]] = {}
        for pos, i in enumerate(indices):
            by_block.setdefault(i // BLOCK, []).append(pos)
        out: list[bytes] = [b""] * len(indices)
        for k, positions in by_block.items():
            ids = self.block_ids(k)
            for pos in positions:
                out[pos] = ids[indices[pos] - k * BLOCK]
        return out

    def pack_id(self, p: int) -> bytes:
        return self._digest(f"pack/{p}", 32)

    def rows(self, packs: list[tuple[bytes, int, int, int]]) -> Iterator[tuple[Any, ...]]:
        """(id, type, pack, offset, length, checksum, key_id) of every entry; appends a
        (pack id, size, blob count, created_ns) row to `packs` for each pack it completes."""
        pack_no, pack_id, offset, count = -1, b"", 0, 0
        created = 1_780_000_000 * 10**9

        def close() -> None:
            if count:
                header = 12 + 64 * count + 44  # design.md §Packs: header and trailer
                packs.append((pack_id, offset + header, count, created + pack_no))

        for k in range((self.entries + BLOCK - 1) // BLOCK):
            ids = self.block_ids(k)
            meta = self._random("meta", k, _META.size * len(ids))
            base = k * BLOCK
            for j, (cs, word, type_byte, key_byte) in enumerate(_META.iter_unpack(meta)):
                p = (base + j) // BLOBS_PER_PACK
                if p != pack_no:
                    close()
                    pack_no, pack_id, offset, count = p, self.pack_id(p), 0, 0
                length = 48 + word * 24
                yield (
                    ids[j],
                    2 if type_byte < 13 else 1,
                    pack_id,
                    offset,
                    length,
                    cs,
                    self.key_ids[key_byte % KEY_IDS],
                )
                offset += length
                count += 1
        close()


def build_index(
    cache: Path, entries: int, seed: int, log: Any = print
) -> tuple[Path, dict[str, Any]]:
    """The cached catalog for (entries, seed), built first if needed. Returns its path and metadata."""
    from coordinator.catalog import MIGRATIONS, SqliteCatalog

    # Keyed by the catalog schema too: a cached index of an older schema would be migrated
    # by every coordinator start, and the start would measure the migration.
    where = cache / f"index-{entries}-s{seed}-g{GENERATOR}-schema{len(MIGRATIONS)}"
    db, meta_path = where / "catalog.db", where / "meta.json"
    if db.exists() and meta_path.exists():
        meta: dict[str, Any] = json.loads(meta_path.read_text())
        return db, {**meta, "cached": True}
    where.mkdir(parents=True, exist_ok=True)
    tmp = where / "catalog.db.tmp"
    for stale in where.glob("catalog.db.tmp*"):
        stale.unlink()
    log(f"building a {entries:,}-entry blob index in {where} ...")
    t0 = time.perf_counter()
    SqliteCatalog(tmp).close()  # the real schema, through the real migrations
    index = SyntheticIndex(entries, seed)
    packs: list[tuple[bytes, int, int, int]] = []
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        # A throwaway file until renamed: no journal, no fsync, a large build cache.
        conn.execute("PRAGMA journal_mode=OFF")
        conn.execute("PRAGMA synchronous=OFF")
        conn.execute("PRAGMA cache_size=-262144")
        secondary = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'blobs' "
            "AND sql IS NOT NULL"
        ).fetchall()
        conn.execute("BEGIN")
        for name, _ in secondary:  # rebuilt below from the same DDL: faster than maintaining it
            conn.execute(f'DROP INDEX "{name}"')
        conn.executemany(
            'INSERT INTO blobs (id, type, pack, "offset", length, checksum, key_id) '
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            index.rows(packs),
        )
        t1 = time.perf_counter()
        for _, sql in secondary:
            conn.execute(sql)
        conn.executemany(
            "INSERT INTO packs (id, size, blob_count, created_ns) VALUES (?, ?, ?, ?)", packs
        )
        conn.execute("COMMIT")
        count = conn.execute("SELECT count(*) FROM blobs").fetchone()[0]
        conn.execute("PRAGMA journal_mode=WAL")  # as the coordinator keeps it
    finally:
        conn.close()
    if count != entries:
        raise RuntimeError(f"built {count} index entries, expected {entries}")
    os.sync()
    tmp.rename(db)
    meta = {
        "entries": entries,
        "seed": seed,
        "generator": GENERATOR,
        "packs": len(packs),
        "db_bytes": db.stat().st_size,
        "build_s": round(time.perf_counter() - t0, 1),
        "insert_s": round(t1 - t0, 1),
    }
    meta_path.write_text(json.dumps(meta, indent=1))
    log(f"built in {meta['build_s']} s ({meta['db_bytes'] / MIB:.0f} MiB, {len(packs):,} packs)")
    return db, {**meta, "cached": False}


# --------------------------------------------------------------------------- /proc


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon and RssFile of a process, in bytes (empty when it is gone)."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                key, _, rest = line.partition(b":")
                if key in (b"VmRSS", b"VmHWM", b"RssAnon", b"RssFile"):
                    out[key.decode()] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def cpu_seconds(pid: int) -> float:
    st = read_stat(pid)
    return 0.0 if st is None else st[1] / _CLK_TCK


def client_cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class PhaseMeter:
    """Coordinator CPU and peak RSS over one phase (VmHWM reset at its start)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.reset = reset_hwm(pid)
        self.cpu0 = cpu_seconds(pid)
        self.client0 = client_cpu_seconds()

    def done(self) -> dict[str, Any]:
        mem = proc_memory(self.pid)
        return {
            "coord_cpu_s": round(cpu_seconds(self.pid) - self.cpu0, 2),
            "client_cpu_s": round(client_cpu_seconds() - self.client0, 2),
            "load_1min": round(os.getloadavg()[0], 2),  # the machine is shared: how busy it was
            "coord_peak_rss_bytes": mem.get("VmHWM"),
            "coord_rss_bytes": mem.get("VmRSS"),
            "coord_rss_file_bytes": mem.get("RssFile"),
            "peak_since_start": not self.reset,
        }


# --------------------------------------------------------------------------- MissingBlobs


@dataclass
class Query:
    ids: bytes  # concatenated
    expected: bytes  # the bitmap the coordinator must answer


def make_queries(index: SyntheticIndex, count: int, present: float, seed: int) -> list[Query]:
    """`count` requests of BATCH ids, `present` of them indexed, shuffled, with their answers."""
    from core.wire import make_bitmap

    rng = random.Random(f"clawback-scale/queries/{seed}/{index.entries}")
    n_present = round(BATCH * present)
    picks = [rng.randrange(index.entries) for _ in range(count * n_present)]
    present_ids = index.ids_at(picks)
    out = []
    for q in range(count):
        batch = [(i, False) for i in present_ids[q * n_present : (q + 1) * n_present]]
        batch += [(rng.randbytes(32), True) for _ in range(BATCH - n_present)]
        rng.shuffle(batch)
        out.append(Query(b"".join(i for i, _ in batch), make_bitmap([m for _, m in batch])))
    return out


@dataclass
class MissingResult:
    callers: int
    requests: int
    ids: int
    seconds: float
    ids_per_s: float
    wrong_answers: int
    latency_ms_p50: float
    latency_ms_p99: float
    ids_per_coord_cpu_s: float  # what one free core of the coordinator answers: steadier than ids/s
    meter: dict[str, Any] = field(default_factory=dict)


async def run_missing(
    address: str,
    tls: Sequence[Any],
    queries: Sequence[Query],
    callers: int,
    duration: float,
    pid: int,
) -> MissingResult:
    """`callers` concurrent callers (one connection and certificate each) for `duration` seconds."""
    from agent.client import open_channel
    from protos.clawback.v1 import agent_pb2, agent_pb2_grpc

    channels = [open_channel(address, tls[c]) for c in range(callers)]
    stubs = [agent_pb2_grpc.AgentServiceStub(ch) for ch in channels]
    requests = [agent_pb2.MissingBlobsRequest(ids=q.ids) for q in queries]
    wrong = 0
    latencies: list[float] = []
    counts = [0] * callers

    async def ask(c: int, n: int) -> None:
        nonlocal wrong
        q = (c + n * callers) % len(queries)
        t = time.perf_counter()
        resp = await stubs[c].MissingBlobs(requests[q])
        latencies.append(time.perf_counter() - t)
        if resp.missing != queries[q].expected:
            wrong += 1

    try:
        # Untimed: connect (TLS handshake) and one request each.
        await asyncio.gather(*(ask(c, 0) for c in range(callers)))
        latencies.clear()
        wrong_warmup, wrong = wrong, 0
        meter = PhaseMeter(pid)
        start = time.perf_counter()
        deadline = start + duration

        async def loop(c: int) -> None:
            n = 1
            while time.perf_counter() < deadline:
                await ask(c, n)
                counts[c] += 1
                n += 1

        await asyncio.gather(*(loop(c) for c in range(callers)))
        seconds = time.perf_counter() - start
        measured = meter.done()
    finally:
        for ch in channels:
            await ch.close()
    total = sum(counts)
    latencies.sort()
    return MissingResult(
        callers=callers,
        requests=total,
        ids=total * BATCH,
        seconds=round(seconds, 3),
        ids_per_s=round(total * BATCH / seconds),
        wrong_answers=wrong + wrong_warmup,
        latency_ms_p50=round(1000 * latencies[len(latencies) // 2], 2) if latencies else 0.0,
        latency_ms_p99=round(
            1000 * latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)], 2
        )
        if latencies
        else 0.0,
        ids_per_coord_cpu_s=round(total * BATCH / measured["coord_cpu_s"])
        if measured["coord_cpu_s"]
        else 0.0,
        meter=measured,
    )


# --------------------------------------------------------------------------- uploads


@dataclass
class AgentUpload:
    name: str
    blobs: int
    bytes: int
    seconds: float = 0.0
    mb_per_s: float = 0.0
    stored: int = 0
    bytes_stored: int = 0
    missing_before: int = 0  # of its ids, how many the coordinator lacked before (all, expected)
    missing_after: int = 0  # ... and after the upload (none, expected)
    error: str = ""


def seal_agent_data(name: str, key_file: Path, mib: float, seed: int) -> list[Any]:
    """One agent's blobs: seeded random plaintext of ~`mib` MiB in 0.5-1.5 MiB chunks, with
    keyed BLAKE3 ids and AES-256-GCM envelopes, as the agent's backup would seal them."""
    from agent.repo import Blob
    from core.chunkid import IdHasher
    from core.envelope import SealingKey, seal
    from core.keys import FileKeyProvider

    keys = FileKeyProvider(key_file)
    hasher = IdHasher(keys.id_key())
    dk = keys.new_data_key()
    sealing = SealingKey(dk.key_id, dk.key)
    rng = random.Random(f"clawback-scale/agent/{seed}/{name}")
    total, out = int(mib * MIB), []
    while total > 0:
        size = min(total, rng.randrange(MIB // 2, 3 * MIB // 2))
        data = rng.randbytes(size)
        blob_id = hasher.blob_id(data)
        out.append(Blob(blob_id, 1, seal(sealing, blob_id, 1, data, None)))
        total -= size
    return out


def _messages(blobs: Sequence[Any], limit: int) -> list[bytes]:
    """The blobs as upload messages of about `limit` bytes, built as the backup builds them."""
    from agent.client import UploadBuilder

    batches: list[list[Any]] = [[]]
    size = 0
    for b in blobs:
        if batches[-1] and size + len(b.envelope) > limit:
            batches.append([])
            size = 0
        batches[-1].append(b)
        size += len(b.envelope)
    out = []
    for batch in batches:
        builder = UploadBuilder(sum(len(b.envelope) + 64 for b in batch) + 1)
        for b in batch:
            builder.reserve(b.id, b.type, len(b.envelope))[:] = b.envelope
        out.append(builder.take())
    return out


async def run_uploads(
    address: str, agents: dict[str, Any], data: dict[str, list[Any]], pid: int
) -> tuple[list[AgentUpload], dict[str, Any]]:
    """Every agent uploads its own blobs at once; returns each agent's result and the phase's."""
    from agent.backup import UPLOAD_BATCH
    from agent.client import GrpcRepoClient, open_channel

    go = asyncio.Event()
    ready: list[asyncio.Future[None]] = []
    results = {n: AgentUpload(n, len(b), sum(len(x.envelope) for x in b)) for n, b in data.items()}
    starts: dict[str, float] = {}

    async def agent(name: str, ready_f: asyncio.Future[None]) -> None:
        res = results[name]
        channel = open_channel(address, agents[name])
        try:
            client = GrpcRepoClient(channel)
            ids = [b.id for b in data[name]]
            messages = _messages(data[name], UPLOAD_BATCH)  # before the clock starts
            res.missing_before = sum(await client.missing(ids))
            ready_f.set_result(None)
            await go.wait()
            t0 = starts["all"]
            stream = await client.open_upload("")
            for msg in messages:
                await stream.send_message(msg)
            stats = await stream.close()
            res.seconds = time.perf_counter() - t0
            res.mb_per_s = round(res.bytes / res.seconds / 1e6, 2)
            res.seconds = round(res.seconds, 3)
            res.stored, res.bytes_stored = stats.blobs_stored, stats.bytes_stored
            res.missing_after = sum(await client.missing(ids))
        except Exception as exc:
            res.error = f"{type(exc).__name__}: {exc}"
            if not ready_f.done():
                ready_f.set_result(None)
        finally:
            await channel.close()

    loop = asyncio.get_running_loop()
    tasks = []
    for name in data:
        f: asyncio.Future[None] = loop.create_future()
        ready.append(f)
        tasks.append(asyncio.ensure_future(agent(name, f)))
    await asyncio.gather(*ready)  # connected, and asked MissingBlobs once
    meter = PhaseMeter(pid)
    starts["all"] = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    phase = meter.done()
    done = [r for r in results.values() if not r.error]
    seconds = max((r.seconds for r in done), default=0.0)
    total = sum(r.bytes for r in done)
    rates = sorted(r.mb_per_s for r in done)
    median = statistics.median(rates) if rates else 0.0
    phase.update(
        agents=len(results),
        bytes=total,
        seconds=round(seconds, 3),
        aggregate_mb_per_s=round(total / seconds / 1e6, 1) if seconds else 0.0,
        per_agent_mb_per_s={
            "min": rates[0] if rates else 0.0,
            "median": round(median, 2),
            "max": rates[-1] if rates else 0.0,
            "min_over_median": round(rates[0] / median, 3) if median else 0.0,
        },
    )
    return list(results.values()), phase


# --------------------------------------------------------------------------- verification


def verify_catalog(
    catalog_path: Path, repo: Path, entries: int, uploads: dict[str, list[Any]], key_id: bytes
) -> list[str]:
    """After the coordinator stopped: every uploaded blob indexed, in an existing pack, with its key."""
    from coordinator.catalog import SqliteCatalog
    from coordinator.pack import pack_path

    problems: list[str] = []
    catalog = SqliteCatalog(catalog_path)
    try:
        ids = [b.id for blobs in uploads.values() for b in blobs]
        count = catalog.count_blobs()
        if count != entries + len(ids):
            problems.append(f"index holds {count:,} blobs, expected {entries:,} + {len(ids):,}")
        where = catalog.blob_locations(ids)
        if len(where) != len(ids):
            problems.append(f"{len(ids) - len(where)} uploaded blobs are not indexed")
        lengths = {b.id: len(b.envelope) for blobs in uploads.values() for b in blobs}
        for pack in {loc.pack for loc in where.values()}:
            if not (repo / pack_path(pack)).is_file():
                problems.append(f"pack {pack.hex()[:16]} is indexed but not in the repository")
        wrong = [i for i, loc in where.items() if loc.length != lengths[i]]
        if wrong:
            problems.append(f"{len(wrong)} uploaded blobs are indexed with the wrong length")
        keys = catalog.blob_key_ids(ids)
        if ids and keys != {key_id}:
            problems.append(
                f"uploaded blobs name keys {sorted(k.hex() for k in keys)}, expected {key_id.hex()}"
            )
    finally:
        catalog.close()
    return problems


# --------------------------------------------------------------------------- the run


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from core.keys import FileKeyProvider
    from core.tls import TlsFiles
    from deploy.devcluster import DevCluster

    log = print
    entries, seed = args.entries, args.seed
    workdir: Path = args.workdir
    db, index_meta = build_index(workdir / "cache", entries, seed, log)
    run_dir = workdir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    n_ids = max(args.agents, max(args.callers))
    names = [f"scale{i:03d}" for i in range(n_ids)]
    cluster = DevCluster(run_dir, {n: {} for n in names}, log_level="warning")
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": host_info(),
        "config": {
            "entries": entries,
            "seed": seed,
            "agents": args.agents,
            "agent_mib": args.agent_mib,
            "callers": args.callers,
            "duration_s": args.duration,
            "present": args.present,
            "batch": BATCH,
        },
        "index": index_meta,
    }
    need = index_meta["db_bytes"] + int(args.agents * args.agent_mib * MIB * 1.2) + (256 << 20)
    free = shutil.disk_usage(workdir).free
    if free < need:
        raise SystemExit(
            f"error: {workdir} has {free / MIB:,.0f} MiB free; the run needs about "
            f"{need / MIB:,.0f} MiB (a copy of the catalog, the uploads)"
        )
    try:
        cluster.write_configs()
        catalog_path = cluster.coord_dir / "catalog.db"
        t = time.perf_counter()
        shutil.copyfile(db, catalog_path)
        log(f"copied the cached catalog in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        cluster.start_coordinator(timeout=300)
        start_s = time.perf_counter() - t
        cluster.init_repository()
        pid = cluster.coordinator_pid
        mem = proc_memory(pid)
        report["coordinator"] = {
            "start_s": round(start_s, 2),
            "rss_after_start_bytes": mem.get("VmRSS"),
            "peak_rss_at_start_bytes": mem.get("VmHWM"),
        }
        log(
            f"coordinator up in {start_s:.1f} s: RSS {_mib(mem.get('VmRSS'))} MiB "
            f"(peak {_mib(mem.get('VmHWM'))} MiB)"
        )
        tls = [
            TlsFiles(
                ca=cluster.pki / "ca.pem",
                cert=cluster.pki / f"agent-{n}.pem",
                key=cluster.pki / f"agent-{n}.key",
            )
            for n in names
        ]
        index = SyntheticIndex(entries, seed)
        t = time.perf_counter()
        queries = make_queries(index, args.pool, args.present, seed)
        log(f"{len(queries)} requests of {BATCH} ids prepared in {time.perf_counter() - t:.1f} s")

        missing: list[MissingResult] = []
        for callers in args.callers:
            res = asyncio.run(
                run_missing(cluster.address, tls, queries, callers, args.duration, pid)
            )
            missing.append(res)
            log(
                f"MissingBlobs, {callers} caller(s): {res.ids_per_s:,.0f} ids/s, "
                f"{res.wrong_answers} wrong answers, peak RSS "
                f"{_mib(res.meter['coord_peak_rss_bytes'])} MiB"
            )
        report["missing"] = [asdict(m) for m in missing]

        keys = FileKeyProvider(cluster.key_file)
        t = time.perf_counter()
        uploaders = names[: args.agents]
        data = {n: seal_agent_data(n, cluster.key_file, args.agent_mib, seed) for n in uploaders}
        log(f"sealed {args.agents} x {args.agent_mib} MiB in {time.perf_counter() - t:.1f} s")
        agents, phase = asyncio.run(
            run_uploads(cluster.address, dict(zip(names, tls, strict=False)), data, pid)
        )
        report["upload"] = {**phase, "per_agent": [asdict(a) for a in agents]}
        log(
            f"uploads: {phase['aggregate_mb_per_s']} MB/s aggregate, per agent "
            f"{phase['per_agent_mb_per_s']}"
        )
        mem = proc_memory(pid)
        report["coordinator"]["peak_rss_end_bytes"] = mem.get("VmHWM")
    finally:
        cluster.stop()

    problems = [
        f"{m.callers} caller(s): {m.wrong_answers} wrong MissingBlobs answers"
        for m in missing
        if m.wrong_answers
    ]
    for a in agents:
        if a.error:
            problems.append(f"agent {a.name}: {a.error}")
        elif a.stored != a.blobs or a.bytes_stored != a.bytes:
            problems.append(f"agent {a.name}: {a.stored}/{a.blobs} blobs stored")
        if a.missing_before != a.blobs or a.missing_after:
            problems.append(
                f"agent {a.name}: {a.missing_before}/{a.blobs} missing before, "
                f"{a.missing_after} after the upload"
            )
    problems += verify_catalog(
        catalog_path, cluster.repo_dir, entries, data, keys.new_data_key().key_id
    )
    report["problems"] = problems
    report["verified"] = not problems
    report["targets"] = targets(report)
    if not args.keep:
        shutil.rmtree(run_dir, ignore_errors=True)
    return report


def targets(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's target: >= 200,000 ids/s for one caller, peak RSS <= 400 MiB, at 10M entries."""
    one = next((m for m in report["missing"] if m["callers"] == 1), None)
    peaks = [report["coordinator"]["peak_rss_at_start_bytes"]] + [
        m["meter"]["coord_peak_rss_bytes"] for m in report["missing"]
    ]
    peak = max((p for p in peaks if p is not None), default=None)
    return {
        "ids_per_s_one_caller": one["ids_per_s"] if one else None,
        "ids_per_s_met": bool(one and one["ids_per_s"] >= TARGET_IDS_PER_S),
        "missing_peak_rss_bytes": peak,
        "rss_met": peak is not None and peak <= TARGET_RSS,
        "at_10m": report["config"]["entries"] >= 10_000_000,
    }


def format_report(report: dict[str, Any]) -> str:
    cfg, idx, coord = report["config"], report["index"], report["coordinator"]
    out = [
        f"Coordinator scale: {cfg['entries']:,}-entry blob index (seed {cfg['seed']}, "
        f"{idx['packs']:,} packs, catalog {idx['db_bytes'] / MIB:,.0f} MiB"
        f"{', cached' if idx.get('cached') else ', built in ' + str(idx.get('build_s')) + ' s'}); "
        f"{report['host']['cpus']} CPUs",
        f"coordinator started in {coord['start_s']} s; RSS after start "
        f"{_mib(coord['rss_after_start_bytes'])} MiB (peak {_mib(coord['peak_rss_at_start_bytes'])} MiB)",
        "",
        f"MissingBlobs: {BATCH} ids per request, {cfg['present']:.0%} present, "
        f"{cfg['duration_s']} s per row",
        "",
        "| callers | requests | ids/s | ids per coord CPU-s | p50 ms | p99 ms | coord CPU s | client CPU s | coord peak RSS MiB | load | wrong answers |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in report["missing"]:
        me = m["meter"]
        out.append(
            f"| {m['callers']} | {m['requests']:,} | {m['ids_per_s']:,} | "
            f"{m['ids_per_coord_cpu_s']:,} | {m['latency_ms_p50']} | "
            f"{m['latency_ms_p99']} | {me['coord_cpu_s']} | {me['client_cpu_s']} | "
            f"{_mib(me['coord_peak_rss_bytes'])} | {me['load_1min']} | {m['wrong_answers']} |"
        )
    up = report.get("upload")
    if up:
        pa = up["per_agent_mb_per_s"]
        out += [
            "",
            f"Uploads: {up['agents']} agents at once, {cfg['agent_mib']} MiB of sealed blobs each "
            f"({up['bytes'] / 1e6:,.0f} MB in all)",
            "",
            "| aggregate MB/s | per agent MB/s min / median / max | min ÷ median | seconds | coord CPU s | client CPU s | coord peak RSS MiB | coord RSS after MiB | load |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
            f"| {up['aggregate_mb_per_s']} | {pa['min']} / {pa['median']} / {pa['max']} | "
            f"{pa['min_over_median']} | {up['seconds']} | {up['coord_cpu_s']} | "
            f"{up['client_cpu_s']} | {_mib(up['coord_peak_rss_bytes'])} | "
            f"{_mib(up['coord_rss_bytes'])} | {up['load_1min']} |",
        ]
    t = report["targets"]
    out += [
        "",
        f"target >= {TARGET_IDS_PER_S:,} ids/s (1 caller): {t['ids_per_s_one_caller']:,} "
        f"{'met' if t['ids_per_s_met'] else 'NOT met'}; coordinator peak RSS <= "
        f"{TARGET_RSS >> 20} MiB: {_mib(t['missing_peak_rss_bytes'])} MiB "
        f"{'met' if t['rss_met'] else 'NOT met'}"
        + ("" if t["at_10m"] else " (below 10M entries: not the issue's size)"),
        "verified: every answer correct, every upload indexed"
        if report["verified"]
        else "VERIFICATION FAILED:\n  " + "\n  ".join(report["problems"]),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scale", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: {QUICK_ENTRIES} entries, 10 agents, shorter",
    )
    parser.add_argument(
        "--entries",
        help=f"blob index entries (default {DEFAULT_ENTRIES}; {QUICK_ENTRIES} with --quick)",
    )
    parser.add_argument(
        "--agents", type=int, help="concurrent uploading agents (default 50; 10 with --quick)"
    )
    parser.add_argument(
        "--agent-mib", type=float, help="MiB each agent uploads (default 8; 4 with --quick)"
    )
    parser.add_argument(
        "--callers",
        help="concurrent MissingBlobs callers, comma-separated (default 1,4,16; 1,4 with --quick)",
    )
    parser.add_argument(
        "--duration", type=float, help="seconds per MissingBlobs row (default 5; 2 with --quick)"
    )
    parser.add_argument(
        "--present",
        type=float,
        default=0.5,
        help="fraction of each request's ids that are indexed (default 0.5)",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=QUERY_POOL,
        help=f"distinct requests, cycled (default {QUERY_POOL})",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the run's repository and catalog")
    args = parser.parse_args(argv)
    try:
        args.entries = parse_count(
            args.entries or (QUICK_ENTRIES if args.quick else DEFAULT_ENTRIES)
        )
        args.callers = [
            int(c) for c in (args.callers or ("1,4" if args.quick else "1,4,16")).split(",")
        ]
    except ValueError as exc:
        parser.error(str(exc))
    if args.agents is None:
        args.agents = 10 if args.quick else 50
    if args.agent_mib is None:
        args.agent_mib = 4.0 if args.quick else 8.0
    if args.duration is None:
        args.duration = 2.0 if args.quick else 5.0
    if args.agents < 1 or min(args.callers) < 1 or not 0 <= args.present <= 1 or args.pool < 1:
        parser.error("--agents, --callers and --pool must be positive, --present within 0..1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    report = run(args)
    print()
    print(format_report(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return 0 if report["verified"] else 1


if __name__ == "__main__":
    sys.exit(main())
