#!/usr/bin/env python3
"""Re-verifies the Portcullis audit chain from JSON lines (the `[audit] sink` file, or
`portcullis audit list`), independently of Portcullis: standard library only.

    python3 scripts/audit-verify.py < audit.jsonl

Exit 0 with "N records, chain intact", or 3 naming the first broken seq. The encoding is
described in docs/operations/audit.md.
"""
import hashlib
import json
import struct
import sys


def record_hash(r, prev):
    fields = [
        "portcullis-audit-v1",
        str(r["seq"]),
        prev,
        str(r["at_unix_ms"]),
        r["actor"],
        r["action"],
        r["target"],
        r["source_ip"] or "",
        json.dumps(r["detail"], separators=(",", ":"), sort_keys=True, ensure_ascii=False),
    ]
    h = hashlib.sha256()
    for f in fields:
        b = f.encode("utf-8")
        h.update(struct.pack(">Q", len(b)) + b)
    return h.hexdigest()


def main():
    prev, expected = "0" * 64, 1
    for line in sys.stdin:
        if not line.strip():
            continue
        r = json.loads(line)
        if r["hash_version"] != 1:
            sys.exit(f"chain BROKEN: seq {r['seq']}: unknown hash version {r['hash_version']}")
        if r["seq"] != expected:
            print(f"chain BROKEN: seq {expected}: missing (gap: the next record is seq {r['seq']})")
            sys.exit(3)
        if record_hash(r, r["prev_hash"]) != r["hash"]:
            print(f"chain BROKEN: seq {r['seq']}: hash mismatch")
            sys.exit(3)
        if r["prev_hash"] != prev:
            print(f"chain BROKEN: seq {r['seq']}: prev mismatch")
            sys.exit(3)
        prev, expected = r["hash"], expected + 1
    print(f"{expected - 1} records, chain intact (head {prev})")


if __name__ == "__main__":
    main()
