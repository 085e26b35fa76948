"""Render a `bench.run --json` report as the Markdown tables of docs/performance.md.

python -m bench.report bench/results/latest.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.run import BOUND, PEERS, STEPS, SUBJECT, TARGET_RATIOS

MIB = 1 << 20


def _f(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def _x(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    summary: dict[str, dict[str, dict[str, Any]]] = report["summary"]
    ratios: dict[str, dict[str, Any]] = report["ratios"]
    tools = [t for t in (SUBJECT, *PEERS, BOUND) if t in summary]
    out: list[str] = []
    host = report["host"]
    vol = report.get("volume", {})
    out.append(
        f"Run {report['started']}: {report['size']} volume (seed {report['seed']}: "
        f"{vol.get('files', 0):,} files, {vol.get('total_bytes', 0) / 1e9:.2f} GB), "
        f"median of {report['repeat']}; {host['cpus']} CPUs ({host.get('cpu_model', '?')}), "
        f"{host['memory_bytes'] / (1 << 30):.1f} GiB RAM, Linux {host['kernel']}, Python {host['python']}; "
        + ", ".join(f"{v}" for v in report.get("versions", {}).values())
        + "."
    )
    out.append("")
    out.append(
        "| step | tool | wall s | CPU s | MB/s | peak RSS MiB | repo MiB |\n|---|---|---:|---:|---:|---|---:|"
    )
    for step in STEPS:
        for t in tools:
            e = summary[t].get(step)
            if not e:
                continue
            rss = ", ".join(
                f"{r.replace('agent:', 'agent ').replace('coordinator', 'coord')} {v / MIB:.0f}"
                for r, v in e["peak_rss_bytes_by_process"].items()
            )
            samples = "/".join(f"{w:.1f}" for w in e["wall_s_samples"])
            out.append(
                f"| {step} | {t} | {e['wall_s']:.2f} ({samples}) | {e['cpu_s']:.1f} | {e['mb_per_s']:.0f} "
                f"| {rss} | {_f(e['repo_bytes'] / MIB if e['repo_bytes'] else None, '{:.0f}')} |"
            )
    out.append("")
    head = "| step | " + " | ".join(f"÷ {p}: wall / CPU / RSS / repo" for p in PEERS)
    out.append(head + " | ÷ faster peer (wall) | target |")
    out.append("|---|" + "---|" * len(PEERS) + "---|---|")
    for step in STEPS:
        r = ratios.get(step)
        if not r:
            continue
        cells = []
        for p in PEERS:
            q = r.get(p)
            cells.append(
                "-"
                if not q
                else f"{_x(q['wall'])} / {_x(q['cpu'])} / {_x(q['peak_rss'])} / {_x(q['repo'])}"
            )
        target = TARGET_RATIOS.get(step)
        verdict = "" if r["meets_wall"] is None else ("met" if r["meets_wall"] else "**not met**")
        out.append(
            f"| {step} | "
            + " | ".join(cells)
            + f" | {_x(r['vs_faster']['wall'])} ({r['faster_peer']}) | <= {target:.2f}x {verdict} |"
        )
    paired = _paired(summary, ratios)
    if paired:
        out.append("")
        out.append(
            f"Paired per repetition ({SUBJECT} ÷ the faster peer in the same repetition): "
            + "; ".join(paired)
            + "."
        )
    for step in STEPS:
        b = ratios.get(step, {}).get("vs_bound")
        if b:
            out.append("")
            out.append(
                f"{step}: {SUBJECT} ÷ `{BOUND} -a` onto a fresh file system (the kernel's bound): "
                f"wall {_x(b['wall'])}, CPU {_x(b['cpu'])}."
            )
    return "\n".join(out)


def _paired(summary: dict[str, dict[str, dict[str, Any]]], ratios: dict[str, Any]) -> list[str]:
    """Per step, the subject's wall time ÷ the faster peer's in each repetition, and their
    median: the machine's drift between repetitions cancels out of each ratio, which the
    ratio of medians does not do."""
    out = []
    for step in STEPS:
        peer = ratios.get(step, {}).get("faster_peer")
        mine = summary.get(SUBJECT, {}).get(step)
        theirs = summary.get(peer, {}).get(step) if peer else None
        if not mine or not theirs:
            continue
        a, b = mine["wall_s_samples"], theirs["wall_s_samples"]
        if len(a) != len(b) or not all(b):
            continue
        each = [x / y for x, y in zip(a, b, strict=True)]
        out.append(
            f"{step} {' / '.join(f'{r:.2f}' for r in each)} (median {statistics.median(each):.2f}x)"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description=__doc__.splitlines()[0]
    )
    parser.add_argument("json", type=Path)
    args = parser.parse_args(argv)
    print(markdown(json.loads(args.json.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
