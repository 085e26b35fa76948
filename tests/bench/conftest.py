"""Fixtures for the benchmark's tests: the peers (restic, Borg) must be there; a missing one fails, never skips.

`make test` does not depend on `make bench-deps`; so that the suite passes in
CI all the same, `peer` installs a missing peer the way `make bench-deps`
does (apt-get / pip, as root) before the first test that needs it.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.peers import ensure_peers

_checked: dict[str, str | None] = {}


@pytest.fixture(scope="session")
def require_peer() -> Callable[[str], None]:
    """require_peer("restic"): install it if missing (root), else fail the test with what to do."""

    def require(name: str) -> None:
        if name not in _checked:
            problems = ensure_peers([name], install=True, log=lambda line: print(line))
            _checked[name] = problems.get(name)
        why = _checked[name]
        if why:
            pytest.fail(
                f"{why}\nThe benchmark tests need restic and Borg: run `make bench-deps` (as root).",
                pytrace=False,
            )

    return require
