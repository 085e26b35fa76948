"""bench.ab: variant parsing, TOML edits, paired ratios, and a real two-variant run."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest

from bench import ab
from bench.ab import AbError, Sample, Variant, paired_ratios, parse_variant, set_toml_key

ROOT = Path(__file__).resolve().parents[2]


def test_parse_variant_reads_settings_and_a_tree() -> None:
    v = parse_variant(
        f"fast:agent.performance.workers=3, coordinator.repository.direct_io=false,@{ROOT}"
    )
    assert v.name == "fast"
    assert v.settings == {
        ("agent", "performance", "workers"): "3",
        ("coordinator", "repository", "direct_io"): "false",
    }
    assert v.tree == str(ROOT)
    assert parse_variant("base") == Variant("base")


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "name"),
        ("a b:agent.x.y=1", "name"),
        ("v:agent.workers=3", "PROCESS.SECTION.KEY=VALUE"),
        ("v:cli.tls.source=1", "PROCESS.SECTION.KEY=VALUE"),
        ("v:agent.performance.workers=", "PROCESS.SECTION.KEY=VALUE"),
        ("v:agent.perf ormance.workers=2", "bare TOML keys"),
        ("v:@/nonexistent/tree", "not a checkout"),
    ],
)
def test_parse_variant_refuses_what_it_cannot_apply(spec: str, says: str) -> None:
    with pytest.raises(AbError, match=says):
        parse_variant(spec)


CONFIG = """\
[agent]
name = "node1"

[performance]
workers = 2

[[source]]
name = "data"
path = "/srv"
"""


def test_set_toml_key_replaces_adds_and_appends() -> None:
    replaced = tomllib.loads(set_toml_key(CONFIG, "performance", "workers", "3"))
    assert replaced["performance"] == {"workers": 3}
    added = tomllib.loads(set_toml_key(CONFIG, "performance", "restore_x", "true"))
    assert added["performance"] == {"workers": 2, "restore_x": True}
    assert added["source"] == [{"name": "data", "path": "/srv"}]  # the next table is untouched
    appended = tomllib.loads(set_toml_key(CONFIG, "repository", "direct_io", "false"))
    assert appended["repository"] == {"direct_io": False}
    assert appended["agent"] == {"name": "node1"}


def _s(variant: str, rnd: int, wall: float, error: str = "") -> Sample:
    return Sample(variant, rnd, wall, wall, {}, {}, error=error)


def test_paired_ratios_compare_within_each_round() -> None:
    # Round 1 runs twice as slow for everyone: the paired ratio does not move.
    samples = [_s("a", 0, 10), _s("b", 0, 8), _s("a", 1, 20), _s("b", 1, 16), _s("b", 2, 1)]
    ratios = paired_ratios(samples, "a")
    assert ratios["a"] == [1.0, 1.0]
    assert ratios["b"] == pytest.approx([0.8, 0.8])  # round 2 has no base: left out
    failed = paired_ratios([*samples[:2], _s("a", 1, 20), _s("b", 1, 1, error="boom")], "a")
    assert failed["b"] == pytest.approx([0.8])
    table = ab.report(samples, ["a", "b", "c"])
    assert "0.800x" in table and "c  " in table


def test_variants_must_be_named_apart(tmp_path: Path) -> None:
    with pytest.raises(AbError, match="must differ"):
        ab.run([Variant("a"), Variant("a")], "restore", 1, tmp_path, "1M", seed=1)
    assert not (tmp_path / "data").exists()  # refused before anything was made


@pytest.mark.integration
def test_two_variants_restore_alternately_verified(tmp_path: Path) -> None:
    work, out = tmp_path / "ab", tmp_path / "ab.json"
    args = ["--variant", "base", "--variant", "buffered:coordinator.repository.direct_io=false"]
    args += ["--rounds", "2", "--size", "12M", "--seed", "3", "--workdir", str(work)]
    assert ab.main([*args, "--json", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert [(s["round"], s["variant"]) for s in samples] == [
        (0, "base"),
        (0, "buffered"),
        (1, "buffered"),
        (1, "base"),
    ]
    assert all(s["verified"] and not s["error"] for s in samples), samples
    # The variant ran with its setting; the base, restarted after it, without.
    (cluster,) = work.glob("cluster*")
    config = tomllib.loads((cluster / "coordinator.toml").read_text())
    assert "direct_io" not in config["repository"]
    log = (cluster / "logs" / "coordinator.log").read_text()
    # Started for the first backup, then restarted before each of the 4 measurements: every
    # variant runs on fresh processes, whatever ran before it.
    assert log.count("coordinator listening on") == 5


@pytest.mark.integration
def test_mutated_step_backs_up_a_changed_copy_in_a_fresh_repository(tmp_path: Path) -> None:
    work, out = tmp_path / "ab", tmp_path / "ab.json"
    args = ["--variant", "base", "--step", "backup-mutated", "--rounds", "2", "--size", "12M"]
    assert ab.main([*args, "--seed", "3", "--workdir", str(work), "--json", str(out)]) == 0
    samples = json.loads(out.read_text())["samples"]
    assert [(s["round"], s["error"]) for s in samples] == [(0, ""), (1, "")]
    # Each measurement had a repository of its own, deleted after it.
    assert not list(work.glob("cluster*"))
    # The copy is the volume with the change applied; the volume itself is untouched.
    changed = [p for p in (work / "mutated").rglob("*") if p.is_file() and not p.is_symlink()]
    originals = {p.relative_to(work / "data") for p in (work / "data").rglob("*")}
    assert any(p.relative_to(work / "mutated") not in originals for p in changed)
