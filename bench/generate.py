"""A seeded, deterministic generator of a realistic node volume and of its realistic change between two backups.

`generate(root, "2G", seed=1)` writes about 40,000 files (sizes and counts scale
with the size):

| part | share of bytes | what |
|---|---|---|
| small files | ~30 % | nested dirs; half text (prose, JSON, CSV, config, code, rotated logs), half random bytes |
| logs | ~6 % | `var/log/app/*.log`, timestamped lines (appended to by `mutate`) |
| database | ~30 % | `var/lib/appdb/main.db`, 8 KiB pages: rows (compressible), blobs (random), sparse index pages |
| large file | ~30 % | `srv/media/archive.bin`, incompressible |
| duplicates | ~3 % | exact copies of small files in other directories |

plus empty files and directories, symlinks (relative, absolute, dangling),
a few hard links, user xattrs, a non-UTF-8 file name, varied modes, owners
(when run as root) and mtimes.

Everything — bytes, names, modes, owners, mtimes — derives from the seed:
the same seed gives an identical tree (`bench.verify.compare_trees` finds no
difference). Random bytes come from a keyed BLAKE3 output stream (seeded,
~1.5 GB/s); text is assembled from seeded word and line pools.

`mutate(root, seed)` applies the change seen between two backups: 5 % of
small files rewritten, 1 % of the database's pages rewritten in place, logs
appended, ~1 % new files, ~0.5 % of files deleted; also deterministic.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import os
import random
import re
import shutil
import stat
import struct
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import blake3

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

#: The reference volume: 2 GiB holds about this many files.
REF_BYTES = 2 * GIB
REF_FILES = 40_000

PAGE_SIZE = 8 * KIB

# Shares of the byte budget (the rest: duplicates, empties, links).
SMALL_SHARE = 0.30
LOG_SHARE = 0.06
DB_SHARE = 0.30
BIG_SHARE = 0.30
DUP_FILE_SHARE = 0.08  # of the file count

DB_REL = "var/lib/appdb/main.db"
BIG_REL = "srv/media/archive.bin"
LOG_DIR_REL = "var/log/app"
EMPTY_DIRS = ("tmp/cache", "srv/app/uploads/pending", "home/bob/Downloads")

#: mtimes of generated files lie in the year before this instant (2023-11-14).
BASE_NS = 1_700_000_000 * 10**9
YEAR_NS = 365 * 86_400 * 10**9

# (area, uid/gid when run as root)
AREAS = (
    ("home/alice", 1000),
    ("home/bob", 1001),
    ("srv/www", 33),
    ("srv/app", 0),
    ("opt/tools", 0),
    ("etc/app", 0),
    ("usr/local/share", 0),
    ("var/lib/app/uploads", 33),
)

TEXT_EXTS = {
    ".txt": "prose",
    ".md": "prose",
    ".html": "prose",
    ".json": "json",
    ".csv": "csv",
    ".conf": "conf",
    ".yaml": "conf",
    ".ini": "conf",
    ".py": "code",
    ".js": "code",
    ".1": "log",  # rotated logs: app.log.1
}
RANDOM_EXTS = (".jpg", ".png", ".gz", ".zip", ".bin", ".pdf", ".woff2", ".pyc", ".webp")
_TEXT_EXT_LIST = tuple(TEXT_EXTS)

_BASE_WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at which
but have an they you were her she there been one all we their has would when if so no will
what can out more up other into could time only new some these two may first then do any like
my now over such our man me even most made after also did many before must through back years
where much your way well down should because each just those people how too little state good
very make world still own see men work long get here between both life being under never day
same another know while last might us great old year off come since against go came right used
take three server request client error warning debug info user session token cache database
query index table column row value config timeout retry backup restore snapshot node cluster
agent volume disk memory thread worker queue message stream packet socket buffer file path
record commit transaction schema version update delete insert select account invoice order
customer product price amount total status pending active closed failed success latency
""".split()  # noqa: SIM905 - a word list reads better as text

# fmt: off
_SYLLABLES = (
    "ka", "lo", "mi", "ter", "vin", "dra", "po", "sel", "an", "tor", "ri", "mu", "ex", "ba",
    "zen", "qui", "lor", "fa", "ne", "sto", "gra", "pel", "dun", "ko", "ra", "vis", "te", "ma",
    "or", "cal", "ul", "bri", "nox", "fen", "har", "pi", "sum", "ot", "del", "ves",
)
# fmt: on

_RANDOM_NAMES = ("img", "photo", "asset", "blob", "data", "archive", "thumb", "cache", "font")
_EMPTY_NAMES = (".keep", "__init__.py", "LOCK", ".gitkeep", "done.flag")


def parse_size(size: str | int) -> int:
    """Bytes from `123`, `"200M"`, `"2G"`, `"1.5GiB"`, `"512k"` (binary units); `"quick"` is 200 MiB."""
    if isinstance(size, int):
        if size <= 0:
            raise ValueError(f"size must be positive, not {size}")
        return size
    text = size.strip().lower()
    if text == "quick":
        return 200 * MIB
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text)
    if not m:
        raise ValueError(f"size {size!r}: expected a number with an optional K, M, G or T suffix")
    value = float(m.group(1)) * {"": 1, "k": KIB, "m": MIB, "g": GIB, "t": 1 << 40}[m.group(2)]
    if value < 1:
        raise ValueError(f"size {size!r} is less than one byte")
    return int(value)


# --------------------------------------------------------------------------- seeded sources


class _Stream:
    """A seeded stream of pseudo-random bytes (keyed BLAKE3 in XOF mode: fast and portable)."""

    def __init__(self, seed: int, name: str) -> None:
        key = hashlib.sha256(f"clawback-bench/{seed}/{name}".encode()).digest()
        self._hasher = blake3.blake3(key=key)
        self._pos = 0

    def read(self, n: int) -> bytes:
        if n <= 0:
            return b""
        out = self._hasher.digest(length=n, seek=self._pos)
        self._pos += n
        return out


def _rng(seed: int, name: str) -> random.Random:
    # A str seed is hashed with SHA-512 (version 2 seeding): independent of PYTHONHASHSEED.
    return random.Random(f"clawback-bench/{seed}/{name}")


class _Text:
    """Seeded word and line pools; text is assembled from them with a Zipf-like word frequency."""

    LEVELS = ("INFO", "INFO", "INFO", "INFO", "DEBUG", "DEBUG", "WARN", "ERROR")

    def __init__(self, seed: int) -> None:
        rng = _rng(seed, "text")
        words = list(_BASE_WORDS)
        seen = set(words)
        while len(words) < 1600:
            w = "".join(rng.choices(_SYLLABLES, k=rng.choice((2, 2, 3, 3, 4))))
            if w not in seen:
                seen.add(w)
                words.append(w)
        self.words = words
        cum, total = [], 0.0
        for i in range(len(words)):
            total += 1.0 / (i + 1) ** 1.05
            cum.append(total)
        self._cum = cum
        self.components = [rng.choice(words[:400]) for _ in range(24)]
        self.pools: dict[str, list[str]] = {
            "prose": [self._prose(rng) for _ in range(3000)],
            "json": [self._json(rng, i) for i in range(3000)],
            "csv": [self._csv(rng, i) for i in range(3000)],
            "conf": [self._conf(rng) for _ in range(1500)],
            "code": [self._code(rng) for _ in range(3000)],
            "msg": [self.sentence(rng, 3, 12) for _ in range(2000)],
        }
        self.pools["log"] = [self._logline(rng) for _ in range(3000)]
        self.pools["rows"] = self.pools["json"] + self.pools["csv"]

    def pick(self, rng: random.Random, k: int) -> list[str]:
        return rng.choices(self.words, cum_weights=self._cum, k=k)

    def sentence(self, rng: random.Random, lo: int, hi: int) -> str:
        return " ".join(self.pick(rng, rng.randint(lo, hi)))

    def _prose(self, rng: random.Random) -> str:
        s = self.sentence(rng, 5, 18)
        return s[:1].upper() + s[1:] + rng.choice((".", ".", ".", "?", ",")) + "\n"

    def _json(self, rng: random.Random, i: int) -> str:
        w = self.pick(rng, 4)
        rec = {
            "id": rng.randrange(10**7),
            "user": f"{w[0]}.{w[1]}",
            "event": w[2],
            "ts": (BASE_NS // 10**9) - rng.randrange(86_400 * 365),
            "tags": self.pick(rng, rng.randint(0, 4)),
            "score": round(rng.random() * 100, 3),
            "ok": rng.random() < 0.9,
            "note": self.sentence(rng, 0, 8),
        }
        if i % 5 == 0:
            rec["ref"] = f"{rng.getrandbits(64):016x}"
        return json.dumps(rec, separators=(",", ":")) + "\n"

    def _csv(self, rng: random.Random, i: int) -> str:
        w = self.pick(rng, 3)
        return (
            f"{i},{w[0]},{w[1]} {w[2]},{rng.randrange(1, 999)},"
            f"{rng.random() * 1000:.2f},{rng.choice(('active', 'closed', 'pending'))}\n"
        )

    def _conf(self, rng: random.Random) -> str:
        a, b, c = self.pick(rng, 3)
        r = rng.random()
        if r < 0.1:
            return f"\n[{a}]\n"
        if r < 0.2:
            return f"# {self.sentence(rng, 3, 10)}\n"
        value = rng.choice(
            (str(rng.randrange(65536)), f'"{b}-{c}"', "true", "false", f"/var/lib/{b}")
        )
        return f"{a}_{b} = {value}\n"

    def _code(self, rng: random.Random) -> str:
        a, b, c = self.pick(rng, 3)
        indent = " " * (4 * rng.randint(0, 3))
        return rng.choice(
            (
                f"{indent}def {a}_{b}(self, {c}):\n",
                f"{indent}return self.{a} + {c}\n",
                f"{indent}if {a} is None or {b} > {rng.randrange(100)}:\n",
                f'{indent}log.info("{self.sentence(rng, 2, 6)}", {a}={b})\n',
                f"{indent}{a} = {b}.{c}({rng.randrange(10)})\n",
                f"{indent}# {self.sentence(rng, 2, 10)}\n",
                "\n",
            )
        )

    def _logline(self, rng: random.Random) -> str:
        # A pool line for small rotated logs; appended logs use `log_lines` (monotonic time).
        t = (BASE_NS // 10**6) - rng.randrange(YEAR_NS // 10**6)
        return self._format_log(rng, t, time.strftime("%Y-%m-%d", time.gmtime(t // 1000)))

    def _format_log(self, rng: random.Random, t_ms: int, day: str) -> str:
        s = (t_ms // 1000) % 86_400
        return (
            f"{day}T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}.{t_ms % 1000:03d}Z "
            f"{rng.choice(self.LEVELS):<5} [{rng.choice(self.components)}] "
            f"{rng.choice(self.pools['msg'])} req={rng.getrandbits(32):08x} "
            f"ms={rng.randrange(1, 900)}\n"
        )

    def log_lines(self, rng: random.Random, start_ms: int, nbytes: int) -> tuple[bytes, int]:
        """Log lines with increasing timestamps from `start_ms`, at least `nbytes` long (whole lines)."""
        out: list[str] = []
        size, t, day_no, day = 0, start_ms, -1, ""
        while size < nbytes:
            t += rng.randrange(0, 2000)
            if t // 86_400_000 != day_no:
                day_no = t // 86_400_000
                day = time.strftime("%Y-%m-%d", time.gmtime(day_no * 86_400))
            line = self._format_log(rng, t, day)
            out.append(line)
            size += len(line)
        return "".join(out).encode(), t

    def text(self, rng: random.Random, kind: str, size: int) -> bytes:
        """`size` bytes of text of `kind` (a key of `pools`)."""
        pool = self.pools[kind]
        parts: list[bytes] = []
        have = 0
        while have < size:
            k = (size - have) // 60 + 2
            chunk = "".join(rng.choices(pool, k=k)).encode()
            parts.append(chunk)
            have += len(chunk)
        return b"".join(parts)[:size]


# --------------------------------------------------------------------------- results


@dataclass
class Manifest:
    """What `generate` wrote (counts and bytes), for reports and sanity checks."""

    root: str = field(compare=False)
    seed: int
    target_bytes: int
    total_bytes: int = 0  # regular-file bytes, each inode once
    files: int = 0  # regular-file paths (hard links included)
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    empty_files: int = 0
    empty_dirs: int = 0
    xattr_files: int = 0
    small_files: int = 0
    text_files: int = 0
    random_files: int = 0
    text_bytes: int = 0
    random_bytes: int = 0
    duplicate_files: int = 0
    duplicate_bytes: int = 0
    log_files: int = 0
    log_bytes: int = 0
    db_path: str = DB_REL
    db_pages: int = 0
    db_bytes: int = 0
    big_path: str = BIG_REL
    big_bytes: int = 0
    seconds: float = field(default=0.0, compare=False)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class MutationSummary:
    """What `mutate` changed."""

    root: str = field(compare=False)
    seed: int
    rewritten_files: int = 0
    rewritten_bytes: int = 0
    deleted_files: int = 0
    added_files: int = 0
    added_bytes: int = 0
    db_pages_changed: int = 0
    logs_appended: int = 0
    log_bytes_appended: int = 0
    seconds: float = field(default=0.0, compare=False)
    changed_paths: list[str] = field(default_factory=list)

    @property
    def written_bytes(self) -> int:
        return (
            self.rewritten_bytes
            + self.added_bytes
            + self.log_bytes_appended
            + self.db_pages_changed * PAGE_SIZE
        )

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        d["written_bytes"] = self.written_bytes
        del d["changed_paths"]
        return d


# --------------------------------------------------------------------------- writers


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb", buffering=0) as f:
        f.write(data)


def _set_xattr(path: Path, name: str, value: bytes) -> bool:
    try:
        os.setxattr(path, name, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            return False  # filesystem without user xattrs: the tree is still valid
        raise
    return True


def _db_page(rng: random.Random, stream: _Stream, text: _Text, page_no: int, lsn: int) -> bytes:
    """One 8 KiB page: a header, then rows (55 %), a blob (30 %) or a sparse index (15 %), a CRC."""
    r = rng.random()
    body_len = PAGE_SIZE - 24 - 4
    if r < 0.55:
        kind = 1
        fill = int(body_len * rng.uniform(0.6, 0.98))
        body = "".join(rng.choices(text.pools["rows"], k=fill // 60 + 2)).encode()[:fill]
    elif r < 0.85:
        kind = 2
        body = stream.read(body_len)
    else:
        kind = 3
        n = rng.randrange(8, 120)
        keys = sorted(rng.getrandbits(63) for _ in range(n))
        body = b"".join(struct.pack("<QI", k, rng.randrange(1 << 31)) for k in keys)
    body = body.ljust(body_len, b"\0")
    header = struct.pack("<4sIQIHH", b"CBPG", page_no, lsn, zlib.crc32(body), kind, len(body))
    page = header + body
    return page + struct.pack("<I", zlib.crc32(page))


def _mtime(rng: random.Random) -> int:
    return BASE_NS - rng.randrange(YEAR_NS)


def generate(root: Path | str, size: str | int, seed: int = 1) -> Manifest:
    """Write a volume of about `size` bytes under `root` (created; must be empty), derived from `seed`."""
    started = time.monotonic()
    root = Path(root)
    target = parse_size(size)
    root.mkdir(parents=True, exist_ok=True)
    if any(root.iterdir()):
        raise ValueError(f"{root} is not empty")
    scale = target / REF_BYTES
    is_root = os.geteuid() == 0
    text = _Text(seed)
    rng = _rng(seed, "layout")
    man = Manifest(root=str(root), seed=seed, target_bytes=target)
    times: dict[Path, int] = {}  # path -> mtime_ns, applied at the end
    owners: dict[Path, int] = {}

    n_files = max(40, round(REF_FILES * scale))
    n_dups = max(2, round(n_files * DUP_FILE_SHARE))
    n_logs = max(2, min(12, round(12 * scale)))
    n_empty = max(3, round(n_files * 0.002))
    n_links = max(4, round(n_files * 0.005))
    n_hard = max(2, round(n_files * 0.001))
    n_small = max(20, n_files - n_dups - n_logs - n_empty - 2)

    # --- directories: area roots, then nested subdirectories (depth up to 7)
    def area_uid(rel: str) -> int:
        for area, uid in AREAS:
            if rel == area or rel.startswith(area + "/"):
                return uid
        return 0

    dirs: list[str] = []
    used: set[str] = set()  # every relative path taken (files, links and directories)
    children: dict[str, set[str]] = {}
    dir_modes: dict[str, int] = {}  # explicit modes; other directories get 0o755

    def add_dir(rel: str, mode: int = 0o755) -> None:
        (root / rel).mkdir(parents=True, exist_ok=True)
        dir_modes[rel] = mode
        dirs.append(rel)
        used.add(rel)
        children.setdefault(rel, set())

    for area, _ in AREAS:
        add_dir(area, 0o750 if area.startswith("home/") else 0o755)
    n_dirs = max(8, n_small // 25)
    for _ in range(n_dirs):
        parent = rng.choice(dirs if rng.random() < 0.3 else dirs[-40:])
        if parent.count("/") >= 8:
            parent = rng.choice(dirs[: len(AREAS)])
        name = rng.choice(text.words[:600])
        if rng.random() < 0.3:
            name += f"-{rng.randrange(100)}"
        if name in children[parent]:
            name += f".{len(children[parent])}"
        children[parent].add(name)
        add_dir(f"{parent}/{name}", 0o700 if rng.random() < 0.08 else 0o755)
    file_dirs = list(dirs)
    for rel in EMPTY_DIRS:
        add_dir(rel)
        man.empty_dirs += 1
    add_dir(LOG_DIR_REL)
    add_dir(str(Path(DB_REL).parent), 0o700)
    add_dir(str(Path(BIG_REL).parent))

    def new_name(d: str, stem: str, ext: str) -> str:
        rel = f"{d}/{stem}{ext}"
        i = 1
        while rel in used:
            rel = f"{d}/{stem}-{i}{ext}"
            i += 1
        used.add(rel)
        return rel

    def file_meta(rel: str, mode: int) -> None:
        p = root / rel
        times[p] = _mtime(rng)
        os.chmod(p, mode)  # explicit: independent of the umask
        if is_root:
            owners[p] = area_uid(rel)

    # --- small files: lognormal sizes scaled to the budget
    raw = [rng.lognormvariate(0.0, 1.4) for _ in range(n_small)]
    factor = target * SMALL_SHARE / sum(raw)
    sizes = [max(1, min(4 * MIB, int(x * factor))) for x in raw]
    small: list[str] = []
    rand_stream = _Stream(seed, "small")
    text_exts = [e for e in _TEXT_EXT_LIST if e != ".1"]
    for i, fsize in enumerate(sizes):
        d = rng.choice(file_dirs)
        is_text = rng.random() < 0.5 or i == 0
        if i == 0:
            # One name that is not UTF-8 (Latin-1 "café"): names are bytes on Linux.
            rel = new_name(d, os.fsdecode(b"caf\xe9"), ".txt")
            data = text.text(rng, "prose", fsize)
            man.text_files += 1
            man.text_bytes += fsize
        elif is_text:
            ext = rng.choice(text_exts) if rng.random() < 0.9 else ".1"
            if ext == ".1":
                rel = new_name(d, f"{rng.choice(text.components)}.log", ".1")
                data = text.text(rng, "log", fsize)
            else:
                rel = new_name(d, "_".join(text.pick(rng, rng.randint(1, 2))), ext)
                data = text.text(rng, TEXT_EXTS[ext], fsize)
            man.text_files += 1
            man.text_bytes += fsize
        else:
            ext = rng.choice(RANDOM_EXTS)
            rel = new_name(d, f"{rng.choice(_RANDOM_NAMES)}_{rng.getrandbits(24):06x}", ext)
            data = rand_stream.read(fsize)
            man.random_files += 1
            man.random_bytes += fsize
        _write(root / rel, data)
        r = rng.random()
        mode = 0o600 if r < 0.1 else 0o755 if r < 0.15 else 0o644
        file_meta(rel, mode)
        small.append(rel)
        man.small_files += 1
        man.total_bytes += fsize

    # --- logs
    log_budget = int(target * LOG_SHARE)
    for i in range(n_logs):
        rel = f"{LOG_DIR_REL}/{text.components[i % len(text.components)]}-{i}.log"
        share = log_budget // n_logs
        data, _ = text.log_lines(rng, BASE_NS // 10**6 - 30 * 86_400_000, share)
        _write(root / rel, data)
        file_meta(rel, 0o640)
        times[root / rel] = BASE_NS - rng.randrange(3600 * 10**9)
        man.log_files += 1
        man.log_bytes += len(data)
        man.total_bytes += len(data)

    # --- the database: 8 KiB pages, written in 8 MiB batches
    db_stream = _Stream(seed, "db")
    db_rng = _rng(seed, "db")
    n_pages = max(16, int(target * DB_SHARE) // PAGE_SIZE)
    with open(root / DB_REL, "wb", buffering=0) as f:
        batch = bytearray()
        for page_no in range(n_pages):
            batch += _db_page(db_rng, db_stream, text, page_no, lsn=page_no + 1)
            if len(batch) >= 8 * MIB:
                f.write(batch)
                batch.clear()
        f.write(batch)
    file_meta(DB_REL, 0o600)
    man.db_pages = n_pages
    man.db_bytes = n_pages * PAGE_SIZE
    man.total_bytes += man.db_bytes

    # --- the large incompressible file
    big = _Stream(seed, "big")
    big_size = max(64 * KIB, int(target * BIG_SHARE))
    with open(root / BIG_REL, "wb", buffering=0) as f:
        left = big_size
        while left:
            n = min(left, 16 * MIB)
            f.write(big.read(n))
            left -= n
    file_meta(BIG_REL, 0o644)
    man.big_bytes = big_size
    man.total_bytes += big_size

    # --- duplicates: exact copies of small files in other directories
    for src in rng.sample(small, min(n_dups, len(small))):
        d = rng.choice(file_dirs)
        rel = new_name(
            d, Path(src).stem + rng.choice(("", "-copy", ".bak", "-old")), Path(src).suffix
        )
        shutil.copyfile(root / src, root / rel)
        file_meta(rel, 0o644)
        man.duplicate_files += 1
        man.duplicate_bytes += (root / rel).stat().st_size
        man.total_bytes += (root / rel).stat().st_size

    # --- empty files
    for _ in range(n_empty):
        rel = new_name(rng.choice(file_dirs), rng.choice(_EMPTY_NAMES), "")
        _write(root / rel, b"")
        file_meta(rel, 0o644)
        man.empty_files += 1

    # --- hard links (a second name for a small file; each inode counted once in total_bytes)
    for src in rng.sample(small[1:], min(n_hard, len(small) - 1)):
        rel = new_name(rng.choice(file_dirs), Path(src).stem + "-link", Path(src).suffix)
        os.link(root / src, root / rel)
        man.hardlinks += 1

    # --- symlinks: relative to a sibling file or a directory, one absolute, one dangling
    for i in range(n_links):
        src = rng.choice(small)
        d = str(Path(src).parent)
        if i == 0:
            rel, link_target = new_name(d, "hostname", ""), "/etc/hostname"
        elif i == 1:
            rel, link_target = new_name(d, "stale", ""), "no-such-file"
        elif i % 4 == 2 and d.count("/") >= 2:
            rel = new_name(d, "up", "")
            link_target = ".."
        else:
            rel = new_name(d, "latest" + Path(src).suffix, "")
            link_target = Path(src).name
        os.symlink(link_target, root / rel)
        times[root / rel] = _mtime(rng)
        man.symlinks += 1

    # --- xattrs on a few files
    for src in rng.sample(small, min(len(small), max(2, round(n_files * 0.002)))):
        ok = _set_xattr(root / src, "user.origin", rng.choice(text.words).encode())
        ok = _set_xattr(root / src, "user.sha256", _Stream(seed, src).read(32)) and ok
        man.xattr_files += ok

    # --- owners, then modes of directories, then mtimes (last: writes change dir mtimes)
    all_dirs = _scan(root, with_files=False)[1]
    for rel in all_dirs:
        os.chmod(root / rel, dir_modes.get(rel, 0o755))
        times[root / rel] = _mtime(rng)
        if is_root:
            owners[root / rel] = area_uid(rel)
    for p, uid in owners.items():
        if uid:
            os.chown(p, uid, uid, follow_symlinks=False)
    for p, ns in times.items():
        os.utime(p, ns=(ns, ns), follow_symlinks=False)
    os.utime(root, ns=(BASE_NS, BASE_NS))
    os.chmod(root, 0o755)

    man.files = (
        man.small_files + man.log_files + 2 + man.duplicate_files + man.empty_files + man.hardlinks
    )
    man.dirs = len(all_dirs)
    man.seconds = round(time.monotonic() - started, 3)
    return man


# --------------------------------------------------------------------------- mutation


def _scan(root: Path, with_files: bool = True) -> tuple[list[str], list[str]]:
    """(regular files, directories) under `root`, as sorted relative paths (symlinks excluded)."""
    files: list[str] = []
    dirs: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir != ".":
            dirs.append(rel_dir)
        for name in sorted(filenames) if with_files else ():
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if stat.S_ISREG(os.lstat(root / rel).st_mode):
                files.append(rel)
    return files, dirs


def mutate(root: Path | str, seed: int) -> MutationSummary:
    """Apply the realistic change between two backups to a generated volume, deterministically from `seed`."""
    started = time.monotonic()
    root = Path(root)
    rng = _rng(seed, "mutate")
    stream = _Stream(seed, "mutate")
    text = _Text(seed)
    summary = MutationSummary(root=str(root), seed=seed)
    mtime = BASE_NS + (1 + seed % 365) * 86_400 * 10**9
    touched: dict[Path, int] = {}

    def touch(p: Path) -> None:
        touched[p] = mtime + rng.randrange(3600 * 10**9)

    files, _ = _scan(root)
    log_prefix = LOG_DIR_REL + "/"
    logs = [f for f in files if f.startswith(log_prefix) and f.endswith(".log")]
    sizes = {f: os.lstat(root / f).st_size for f in files}
    small = [
        f for f in files if f not in (DB_REL, BIG_REL) and not f.startswith(log_prefix) and sizes[f]
    ]

    # 5 % of small files rewritten in place (same inode, new bytes, size within -20 %..+25 %)
    n_rewrite = max(1, round(len(small) * 0.05)) if small else 0
    n_delete = max(1, round(len(small) * 0.005)) if len(small) > n_rewrite else 0
    picked = rng.sample(small, n_rewrite + n_delete)
    for rel in sorted(picked[:n_rewrite]):
        p = root / rel
        new_size = max(1, int(sizes[rel] * rng.uniform(0.8, 1.25)))
        kind = TEXT_EXTS.get(Path(rel).suffix)
        data = text.text(rng, kind, new_size) if kind else stream.read(new_size)
        _write(p, data)
        touch(p)
        summary.rewritten_files += 1
        summary.rewritten_bytes += new_size
        summary.changed_paths.append(rel)

    # ~0.5 % deleted
    for rel in sorted(picked[n_rewrite:]):
        (root / rel).unlink()
        touch((root / rel).parent)
        summary.deleted_files += 1
        summary.changed_paths.append(rel)

    # ~1 % added, in existing directories and one new one
    # New files go where small files already live (empty directories stay empty).
    file_dirs = sorted({os.path.dirname(f) for f in small} - {""})
    if file_dirs:
        new_dir = root / rng.choice(file_dirs) / f"new-{seed}"
        new_dir.mkdir(exist_ok=True)
        os.chmod(new_dir, 0o755)
        touch(new_dir.parent)
        avg = sum(sizes[f] for f in small) // len(small)
        n_add = max(1, round(len(small) * 0.01))
        for i in range(n_add):
            d = new_dir if i % 3 == 0 else root / rng.choice(file_dirs)
            size = max(1, int(avg * rng.lognormvariate(-0.5, 1.0)))
            if rng.random() < 0.5:
                ext = rng.choice([e for e in _TEXT_EXT_LIST if e != ".1"])
                data = text.text(rng, TEXT_EXTS[ext], size)
            else:
                ext = rng.choice(RANDOM_EXTS)
                data = stream.read(size)
            p = d / f"new-{seed}-{i:05d}{ext}"
            _write(p, data)
            os.chmod(p, 0o644)
            touch(p)
            touch(d)
            summary.added_files += 1
            summary.added_bytes += size
            summary.changed_paths.append(str(p.relative_to(root)))

    # 1 % of the database pages rewritten in place (new LSN)
    db = root / DB_REL
    if db.exists():
        n_pages = db.stat().st_size // PAGE_SIZE
        k = max(1, round(n_pages * 0.01)) if n_pages else 0
        fd = os.open(db, os.O_WRONLY)
        try:
            for page_no in sorted(rng.sample(range(n_pages), k)):
                page = _db_page(rng, stream, text, page_no, lsn=10**9 + seed * n_pages + page_no)
                os.pwrite(fd, page, page_no * PAGE_SIZE)
        finally:
            os.close(fd)
        touch(db)
        summary.db_pages_changed = k
        summary.changed_paths.append(DB_REL)

    # logs appended (2 % of their size, at least a line)
    for rel in logs:
        p = root / rel
        data, _ = text.log_lines(rng, mtime // 10**6, max(200, p.stat().st_size // 50))
        with open(p, "ab", buffering=0) as f:
            f.write(data)
        touch(p)
        summary.logs_appended += 1
        summary.log_bytes_appended += len(data)
        summary.changed_paths.append(rel)

    for p, ns in touched.items():
        with contextlib.suppress(FileNotFoundError):
            os.utime(p, ns=(ns, ns), follow_symlinks=False)
    summary.seconds = round(time.monotonic() - started, 3)
    return summary


# --------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.generate", description=__doc__.splitlines()[0]
    )
    parser.add_argument("dir", type=Path, help="directory to create (must be empty or absent)")
    parser.add_argument(
        "--size", default="2G", help="approximate volume size: 200M, 2G, ... (default 2G)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--mutate", type=int, metavar="SEED", help="instead of generating, mutate DIR with SEED"
    )
    parser.add_argument("--force", action="store_true", help="delete DIR first if it exists")
    args = parser.parse_args(argv)
    try:
        if args.mutate is not None:
            result: Manifest | MutationSummary = mutate(args.dir, args.mutate)
        else:
            if args.force and args.dir.exists():
                shutil.rmtree(args.dir)
            result = generate(args.dir, args.size, args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result.to_json(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
