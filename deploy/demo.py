"""`make demo`: a coordinator and two agents on this machine; back up node1, restore onto node2, verify every byte.

Run from the repository root: `python -m deploy.demo [--workdir DIR] [--size 64M] [--keep]`.
Everything it starts is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.generate import generate
from bench.verify import compare_trees
from deploy.devcluster import ClusterError, DevCluster
from deploy.sample import make_tricky_tree


def step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def show(cluster: DevCluster, *args: str) -> str:
    print(f"$ clawback {' '.join(args)}", flush=True)
    out = cluster.cli(*args)
    if out.stderr:  # progress lines come before the final table
        print(out.stderr.rstrip(), flush=True)
    if out.stdout:
        print(out.stdout.rstrip(), flush=True)
    return out.stdout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="demo", description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("demo-run"))
    ap.add_argument("--size", default="64M", help="size of the generated node data")
    ap.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    ap.add_argument(
        "--file-keys",
        action="store_true",
        help="use a development CA and key file instead of Vault (OpenBao)",
    )
    args = ap.parse_args(argv)

    work = args.workdir.resolve()
    shutil.rmtree(work, ignore_errors=True)
    data = work / "node1-data"
    target = work / "node2-restore"

    step(f"generating sample data for node1 in {data}")
    generate(data / "volume", args.size, seed=1)
    notes = make_tricky_tree(data / "tricky")
    for n in notes:
        print(f"   note: {n}")

    cluster = DevCluster(
        work / "cluster",
        {"node1": {"data": data}, "node2": {}},
        vault=not args.file_keys,
        vault_certs=not args.file_keys,
    )
    t0 = time.monotonic()
    try:
        keys = (
            "a development CA and key file"
            if args.file_keys
            else "Vault (an OpenBao server): transit keys, KV id key, PKI certificates"
        )
        step(f"starting a coordinator and two agents (mTLS on loopback; {keys})")
        cluster.start()
        if cluster.vault is not None:
            print(
                f"   Vault at {cluster.vault.settings.address}: agents log in with AppRole and may "
                "create data keys but never unwrap them"
            )
        print(f"   coordinator at {cluster.address}; repository {cluster.repo_dir}")
        show(cluster, "agents")

        step("backing up node1")
        show(cluster, "backup", "--agent", "node1", "--source", "data", "--wait")
        snaps = cluster.cli_json("snapshots")
        snap = snaps[-1]["id"]
        show(cluster, "snapshots")
        show(cluster, "ls", snap[:8], "tricky/links")

        step("backing up node1 again: unchanged files are neither read nor uploaded")
        show(cluster, "backup", "--agent", "node1", "--source", "data", "--wait")

        step(
            "restoring node1's first snapshot onto node2"
            + ("" if args.file_keys else " (with a single-use restore grant from Vault)")
        )
        show(cluster, "restore", snap[:8], "--agent", "node2", "--target", str(target), "--wait")

        step("verifying every file byte for byte, with owners, modes, times, links and xattrs")
        diffs = compare_trees(data, target)
        if diffs:
            print(f"   {len(diffs)} differences:")
            for d in diffs[:20]:
                print(f"   - {d}")
            return 1
        print("   restored tree is identical to the source")

        step("checking the repository (every pack read and checksummed)")
        show(cluster, "check", "--read-data")

        snaps = cluster.cli_json("snapshots")
        print("\nsummary:")
        print(
            json.dumps(
                {
                    "snapshots": len(snaps),
                    "seconds": round(time.monotonic() - t0, 1),
                    "verified": True,
                    "workdir": str(work),
                },
                indent=1,
            )
        )
        return 0
    except ClusterError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
