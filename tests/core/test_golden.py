"""Format v1 golden fixtures (tests/fixtures/golden/): bytes written once from the design.md grammar must stay readable.

Never regenerate these files to make a test pass: a failure here means a
reader of format v1 broke. A new format version gets new fixtures beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

from coordinator.snaprecord import decode_record, encode_record
from core.chunkid import IdHasher
from core.envelope import HEADER, SealingKey, open_
from core.tree import decode_tree
from protos.clawback.v1 import repo_pb2

GOLDEN = Path(__file__).resolve().parents[1] / "fixtures" / "golden"


def test_envelope_v1_opens_and_its_id_rederives() -> None:
    meta = json.loads((GOLDEN / "envelope-v1.json").read_text())
    env = (GOLDEN / "envelope-v1.bin").read_bytes()
    key = SealingKey(bytes.fromhex(meta["key_id"]), bytes.fromhex(meta["data_key"]))
    blob_id = bytes.fromhex(meta["blob_id"])
    version, flags, btype, cipher, key_id, _nonce = HEADER.unpack_from(env)
    assert (version, flags, btype, cipher, key_id) == (1, 1, 1, 1, key.key_id)
    plain = open_(lambda _k: key, blob_id, 1, env)
    assert plain == bytes.fromhex(meta["plaintext"])
    assert IdHasher(bytes.fromhex(meta["id_key"])).blob_id(plain) == blob_id


def test_tree_v1_decodes() -> None:
    tree = decode_tree([(GOLDEN / "tree-v1.bin").read_bytes()])
    names = [(n.name, n.type) for n in tree.nodes]
    assert names == [
        (b"a.txt", repo_pb2.NODE_TYPE_FILE),
        (b"link", repo_pb2.NODE_TYPE_SYMLINK),
        (b"sub", repo_pb2.NODE_TYPE_DIR),
    ]
    a, link, sub = tree.nodes
    assert a.mtime_ns == 1_700_000_000_123_456_789 and (a.uid, a.gid, a.mode) == (1000, 1000, 0o644)
    assert link.link_target == b"a.txt" and sub.xattrs[0].name == b"user.k"


def test_snapshot_record_v1_decodes_and_reencodes_identically() -> None:
    data = (GOLDEN / "snapshot-v1.bin").read_bytes()
    rec = decode_record(data, "golden")
    assert rec.info.agent == "node1" and rec.info.root == b"\x03" * 32 and len(rec.refs) == 2
    assert encode_record(rec.info, rec.refs) == data
