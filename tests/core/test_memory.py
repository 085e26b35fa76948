"""core/memory.py: glibc malloc settings yield to glibc's own environment variables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = """
import json, sys
from core.memory import MiB, tune_malloc, trim_malloc
done = tune_malloc(arenas=2, mmap_threshold=16 * MiB, trim_threshold=64 * MiB)
print(json.dumps({"done": done, "trim": trim_malloc()}))
"""


def _probe(env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_every_setting_is_made_unless_its_variable_is_set() -> None:
    got = _probe({})
    assert got["done"] == {
        "MALLOC_ARENA_MAX": 2,
        "MALLOC_MMAP_THRESHOLD_": 16 * 1024 * 1024,
        "MALLOC_TRIM_THRESHOLD_": 64 * 1024 * 1024,
    }
    assert got["trim"] in (True, False)  # False when nothing could be released
    got = _probe({"MALLOC_TRIM_THRESHOLD_": "1000000", "MALLOC_ARENA_MAX": "4"})
    assert got["done"] == {"MALLOC_MMAP_THRESHOLD_": 16 * 1024 * 1024}
