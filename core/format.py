"""Repository format v1: constants, algorithm names and the repository config (design.md §Repository)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field

from core.errors import IntegrityError

FORMAT_VERSION = 1
ID_SIZE = 32  # a blob id: keyed BLAKE3 of the plaintext
KEY_ID_SIZE = 16
# design.md §Blob envelope: the key id sits in the clear at bytes 4..20 of every envelope,
# so the coordinator can tell which data keys a snapshot needs without reading anything secret.
ENVELOPE_KEY_ID = slice(4, 20)
MAX_BLOB_SIZE = 16 * 1024 * 1024  # largest sealed blob accepted (chunk max 4 MiB + slack for trees)
MAX_MESSAGE_SIZE = 24 * 1024 * 1024  # gRPC send/receive limit on both sides
MAX_IDS_PER_QUERY = 65536
TREE_PART_SIZE = 4 * 1024 * 1024  # a serialized tree larger than this is split into parts

# New repositories (docs/performance.md §Third tuning pass): 256 KiB chunks keep what a
# change to a page-structured file (a database) re-uploads to a quarter of what 1 MiB chunks
# did, and let the agent read in 4 MiB blocks; zstd-1 compresses this volume's text ~25 %
# faster than zstd-3 for ~2 % more stored bytes.
DEFAULT_CHUNKER = "fastcdc-256k"
DEFAULT_COMPRESSION = "zstd-1"
DEFAULT_CIPHER = "aes256-gcm"
ID_ALGORITHM = "blake3-keyed"
# design.md §Paged files: database files are cut on a fixed grid, so a page rewritten in place
# re-uploads one 64 KiB chunk instead of the ~350 KiB content-defined chunk around it
# (docs/performance.md §Ninth tuning pass). Names, or paths from the backup root when the
# pattern has a '/': SQLite, Berkeley DB and other *.db, InnoDB, WiredTiger, LMDB, PostgreSQL.
DEFAULT_PAGED_CHUNKER = "fixed-64k"
DEFAULT_PAGED_FILES = (
    "*.db",
    "*.sqlite",
    "*.sqlite3",
    "*.db3",
    "*.ibd",
    "ibdata*",
    "*.wt",
    "*.mdb",
    "*/base/*/[0-9]*",
    "*/global/[0-9]*",
)
# design.md §Paged files: formats recognised by their first bytes, whatever the file's name:
# name -> (offset, signature). Names are stored in repository configs: never change an entry.
PAGED_FORMATS: dict[str, tuple[int, bytes]] = {
    "sqlite3": (0, b"SQLite format 3\x00"),
    # bbolt (etcd, Consul, Vault's raft storage...): the meta page's magic 0xED0CDAED and
    # version 2, little-endian, after its 16-byte page header.
    "bbolt": (16, b"\xed\xda\x0c\xed\x02\x00\x00\x00"),
}
DEFAULT_PAGED_FORMATS = ("sqlite3", "bbolt")
MAX_PAGED_FILES = 64  # patterns in a repository config
MAX_PATTERN_LENGTH = 255


@dataclass(frozen=True)
class RepoConfig:
    """The repository's `config` object: everything an agent must agree on."""

    repo_id: str
    chunker: str = DEFAULT_CHUNKER
    compression: str = DEFAULT_COMPRESSION
    cipher: str = DEFAULT_CIPHER
    id_algorithm: str = ID_ALGORITHM
    key_check: str = ""  # hex; MAC of a constant under the id key
    version: int = FORMAT_VERSION
    created_ns: int = 0
    extra: dict[str, str] = field(default_factory=dict)
    # Files matching `paged_files` are cut with `paged_chunker` instead of `chunker`
    # (design.md §Paged files). Absent from configs written before it: no such files.
    paged_chunker: str = ""
    paged_files: tuple[str, ...] = ()
    # Files in one of these formats (PAGED_FORMATS) are cut with `paged_chunker` too.
    paged_formats: tuple[str, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> RepoConfig:
        try:
            raw = json.loads(data)
            for name in ("paged_files", "paged_formats"):
                if isinstance(raw.get(name), list):
                    raw[name] = tuple(raw[name])
            cfg = cls(**raw)
            check_paged_files(cfg.paged_files)
            if not isinstance(cfg.paged_formats, tuple) or not all(
                isinstance(f, str) for f in cfg.paged_formats
            ):
                raise ValueError("paged_formats must be a list of names")
        except (ValueError, TypeError, AttributeError) as exc:
            raise IntegrityError(f"repository config is unreadable: {exc}") from exc
        if cfg.version != FORMAT_VERSION:
            raise IntegrityError(
                f"repository format version {cfg.version} is not supported (this build reads {FORMAT_VERSION})"
            )
        return cfg


def new_repo_id() -> str:
    return os.urandom(16).hex()


def check_paged_files(patterns: object) -> tuple[str, ...]:
    """`patterns` as a tuple if it is a valid list of paged-file patterns; ValueError says why."""
    if not isinstance(patterns, (list, tuple)):
        raise ValueError("paged_files must be a list of patterns")
    if len(patterns) > MAX_PAGED_FILES:
        raise ValueError(f"at most {MAX_PAGED_FILES} paged-file patterns ({len(patterns)} given)")
    for p in patterns:
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"paged-file pattern {p!r} is empty or not text")
        if len(p) > MAX_PATTERN_LENGTH or "\0" in p:
            raise ValueError(
                f"paged-file pattern {p[:40]!r}: at most {MAX_PATTERN_LENGTH} characters, no NUL"
            )
    return tuple(patterns)


def check_paged_formats(names: object) -> tuple[str, ...]:
    """`names` as a tuple if each is a format of PAGED_FORMATS (once); ValueError says why."""
    if not isinstance(names, (list, tuple)):
        raise ValueError("paged_formats must be a list of names")
    for n in names:
        if n not in PAGED_FORMATS:
            raise ValueError(
                f"unknown paged format {n!r} (known: {', '.join(sorted(PAGED_FORMATS))})"
            )
    if len(set(names)) != len(names):
        raise ValueError("a paged format is named twice")
    return tuple(names)
