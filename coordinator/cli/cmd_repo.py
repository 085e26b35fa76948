"""`clawback repo init`, `info` and `set`: create the key material and the repository, show
its config, change what may change in it."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.cli.output import human_size, repo_dict
from core import errors

if TYPE_CHECKING:
    from coordinator.cli.client import AdminClient
    from coordinator.cli.main import Context

CHUNKERS = ("fastcdc-1m", "fastcdc-256k")
PAGED_CHUNKERS = ("fixed-64k", "none")
PAGED_FORMATS = ("sqlite3", "bbolt", "none")


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    repo = subs.add_parser("repo", help="initialise or describe the repository", parents=[common])
    repo.set_defaults(func=None, parser=repo)
    rsubs = repo.add_subparsers(dest="repo_command", metavar="SUBCOMMAND")

    init = rsubs.add_parser(
        "init",
        help="write a new key file and initialise the repository",
        parents=[common],
        description="Create the key file (mode 0600; never overwritten) with --key-file or [keys] file, "
        "then initialise the coordinator's repository with its key check.",
    )
    init.add_argument(
        "--chunker", choices=CHUNKERS, default="", help="chunker (default fastcdc-256k)"
    )
    init.add_argument(
        "--compression", default="", metavar="NAME", help="compression (default zstd-1)"
    )
    init.add_argument(
        "--paged-chunker",
        choices=PAGED_CHUNKERS,
        default="",
        help="chunker for database-like files, cut on a fixed grid so that a page rewritten in "
        "place re-uploads one chunk (default fixed-64k; none: every file content-defined)",
    )
    init.add_argument(
        "--paged-files",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a file name (or, with '/', a path from the backup root) cut with the paged "
        "chunker; repeatable; replaces the default list (*.db, *.sqlite, PostgreSQL, InnoDB...)",
    )
    init.add_argument(
        "--paged-formats",
        action="append",
        default=[],
        choices=PAGED_FORMATS,
        metavar="FORMAT",
        help="files of this format (sqlite3, bbolt) are cut with the paged chunker whatever "
        "their names; repeatable; default both; none: by name only",
    )
    init.set_defaults(func=run_init)

    info = rsubs.add_parser("info", help="show the repository config", parents=[common])
    info.set_defaults(func=run_info)

    set_ = rsubs.add_parser(
        "set",
        help="change the compression or the paged-file policy",
        parents=[common],
        description="Change what may change in the repository's config; stored data stays valid. "
        "Backups started afterwards use the new config. Changing the paged-file policy makes "
        "every agent's next backup read all its files again (their files caches were made under "
        "the old policy); only the chunks of files cut differently are stored anew.",
    )
    set_.add_argument(
        "--compression", default="", metavar="NAME", help="compression of blobs stored from now on"
    )
    set_.add_argument(
        "--paged-chunker",
        choices=PAGED_CHUNKERS,
        default="",
        help="chunker for database-like files (none: every file content-defined); the default "
        "patterns and formats come with it unless --paged-files/--paged-formats say otherwise",
    )
    set_.add_argument(
        "--paged-files",
        action="append",
        default=[],
        metavar="PATTERN",
        help="a file name (or, with '/', a path from the backup root) cut with the paged chunker; "
        "repeatable; replaces the repository's list",
    )
    set_.add_argument(
        "--paged-formats",
        action="append",
        default=[],
        choices=PAGED_FORMATS,
        metavar="FORMAT",
        help="files of this format (sqlite3, bbolt) are cut with the paged chunker whatever "
        "their names; repeatable; replaces the repository's list; none: by name only",
    )
    set_.set_defaults(func=run_set)


def _choices(args: argparse.Namespace) -> dict[str, Any]:
    """The settings `init` and `set` share (`set` has no --chunker: cuts are for good)."""
    if (args.paged_files or args.paged_formats) and args.paged_chunker == "none":
        raise errors.UsageError(
            "--paged-files and --paged-formats name files for a paged chunker, and it is none"
        )
    if "none" in args.paged_formats and len(args.paged_formats) > 1:
        raise errors.UsageError("--paged-formats none stands alone")
    return {
        "compression": args.compression,
        "paged_chunker": args.paged_chunker,
        "paged_files": args.paged_files,
        "paged_formats": args.paged_formats,
    }


def _refuse_existing(client: AdminClient) -> None:
    try:
        existing = client.get_repository()
    except (errors.RepositoryMissing, errors.NotFound):
        return
    raise errors.AlreadyExists(
        f"the repository at {client.address} already exists (repo id {existing.repo_id})"
    )


def run_init(ctx: Context, args: argparse.Namespace) -> int:
    from core.keys import create_key_file

    choices = _choices(args)
    client = ctx.client()
    if ctx.settings.key_provider == "vault":
        return _init_with_vault(ctx, args)
    key_file = ctx.key_file()
    _refuse_existing(client)
    key_check = create_key_file(key_file)
    try:
        cfg = client.init_repository(key_check, chunker=args.chunker, **choices)
    except errors.TransportError:
        ctx.out.note(
            f"clawback: kept {key_file}: the coordinator may have initialised the repository with it"
        )
        raise
    except errors.ClawbackError:
        # Refused for sure: the fresh key file protects nothing, so a retry must not trip over it.
        with contextlib.suppress(OSError):
            Path(key_file).unlink()
        raise
    if ctx.out.json_mode:
        ctx.out.json({**repo_dict(cfg), "key_file": str(key_file)})
        return 0
    ctx.out.line(f"initialised repository {cfg.repo_id} at {client.address}")
    ctx.out.line(f"key file: {key_file} (mode 0600)")
    ctx.out.note(
        "keep a copy of the key file somewhere safe: without it no backup can be read; "
        "anyone holding it can read every backup (development key provider)"
    )
    return 0


def _init_with_vault(ctx: Context, args: argparse.Namespace) -> int:
    """Vault holds the id key (written once by `clawback vault setup`): only its check goes to the
    coordinator, computed through a single-use grant (the operator role cannot read the key)."""
    from core import chunkid

    choices = _choices(args)
    client = ctx.client()
    _refuse_existing(client)
    key_check = chunkid.key_check(ctx.key_provider().id_key())
    cfg = client.init_repository(key_check, chunker=args.chunker, **choices)
    if ctx.out.json_mode:
        ctx.out.json({**repo_dict(cfg), "keys": "vault"})
        return 0
    ctx.out.line(f"initialised repository {cfg.repo_id} at {client.address}")
    ctx.out.line("keys: Vault (transit data keys per snapshot, chunk-id key in KV)")
    return 0


def run_set(ctx: Context, args: argparse.Namespace) -> int:
    choices = _choices(args)
    if not any(choices.values()):
        raise errors.UsageError(
            "nothing to change: give --compression, --paged-chunker, --paged-files or "
            "--paged-formats"
        )
    client = ctx.client()
    before = client.get_repository()
    cfg = client.update_repository(**choices)
    paged_changed = _paged(before) != _paged(cfg)
    if ctx.out.json_mode:
        ctx.out.json({"coordinator": client.address, **repo_dict(cfg)})
        return 0
    changed = [
        f"{name}: {new} (was {old})"
        for name, old, new in (
            ("compression", before.compression, cfg.compression),
            ("paged files", _paged(before), _paged(cfg)),
        )
        if old != new
    ]
    if not changed:
        ctx.out.line(f"repository {cfg.repo_id}: unchanged")
        return 0
    ctx.out.line(f"repository {cfg.repo_id}:")
    for line in changed:
        ctx.out.line(f"  {line}")
    if paged_changed:
        ctx.out.note(
            "every agent's next backup reads all its files again: their files caches were made "
            "under the old paged-file policy"
        )
    return 0


def _paged(cfg: Any) -> str:
    if not cfg.paged_chunker:
        return "none (every file content-defined)"
    by_name = ", ".join(cfg.paged_files) or "no names"
    by_format = ", ".join(cfg.paged_formats) or "none"
    return f"{cfg.paged_chunker} for {by_name}; formats {by_format}"


def run_info(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.client()
    cfg = client.get_repository()
    pairs: list[tuple[str, object]] = [
        ("coordinator", client.address),
        ("repository", cfg.repo_id),
        ("format version", cfg.version),
        (
            "chunker",
            f"{cfg.chunker} (min {human_size(cfg.chunk_min)}, avg {human_size(cfg.chunk_avg)}, "
            f"max {human_size(cfg.chunk_max)})",
        ),
        ("paged files", _paged(cfg)),
        ("compression", cfg.compression),
        ("cipher", cfg.cipher),
        ("id algorithm", cfg.id_algorithm),
        ("key check", cfg.key_check.hex()),
        ("max blob size", human_size(cfg.max_blob_size)),
        ("max message size", human_size(cfg.max_message_size)),
    ]
    ctx.out.fields(pairs, {"coordinator": client.address, **repo_dict(cfg)})
    return 0
