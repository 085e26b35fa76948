"""The exception tree of clawback, grouped by what a caller can do about it.

    ClawbackError                      exit 1
    ├── UsageError                     exit 2   fix the command line
    ├── ConfigError                    exit 2   fix the config file (names file, key, reason)
    ├── TransportError                 exit 4   retry: coordinator/agent unreachable, stream cut
    │   └── Unavailable                exit 4
    ├── NotFound                       exit 5   no such snapshot / agent / job / path
    ├── AlreadyExists                  exit 6
    ├── PermissionDenied               exit 7   certificate unknown, revoked, or wrong role
    ├── ResourceExhausted              exit 8   disk full, message too large
    ├── KeyMaterialError               exit 9   wrong or missing key material
    ├── RepositoryMissing              exit 10  no repository initialised (restic uses 10 too)
    ├── IntegrityError                 exit 11  alarm: authentication failed, checksum mismatch
    └── PartialFailure                 exit 3   finished, but some entries failed (restic: 3)

`ExitCode` is the documented table (README §Exit codes); the CLI maps every
ClawbackError to `err.exit_code`.
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    ERROR = 1
    USAGE = 2
    PARTIAL = 3
    TRANSPORT = 4
    NOT_FOUND = 5
    EXISTS = 6
    PERMISSION = 7
    EXHAUSTED = 8
    KEY = 9
    NO_REPOSITORY = 10
    INTEGRITY = 11
    INTERRUPTED = 130


class ClawbackError(Exception):
    """Root of every error clawback raises on purpose."""

    exit_code: ExitCode = ExitCode.ERROR


class UsageError(ClawbackError):
    exit_code = ExitCode.USAGE


class ConfigError(ClawbackError):
    """A config file is malformed; the message names the file, the key and the reason."""

    exit_code = ExitCode.USAGE

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file, self.key, self.reason = file, key, reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class TransportError(ClawbackError):
    exit_code = ExitCode.TRANSPORT


class Unavailable(TransportError):
    pass


class NotFound(ClawbackError):
    exit_code = ExitCode.NOT_FOUND


class AlreadyExists(ClawbackError):
    exit_code = ExitCode.EXISTS


class PermissionDenied(ClawbackError):
    exit_code = ExitCode.PERMISSION


class ResourceExhausted(ClawbackError):
    exit_code = ExitCode.EXHAUSTED


class KeyMaterialError(ClawbackError):
    """Wrong, missing or unreadable key material."""

    exit_code = ExitCode.KEY


class RepositoryMissing(ClawbackError):
    exit_code = ExitCode.NO_REPOSITORY


class IntegrityError(ClawbackError):
    """Data failed authentication or a checksum: never silently ignored."""

    exit_code = ExitCode.INTEGRITY


class PartialFailure(ClawbackError):
    exit_code = ExitCode.PARTIAL
