#!/usr/bin/env python3
"""Re-verifies the Portcullis audit chain from JSON lines (the `[audit] sink` file, or
`portcullis audit list`), independently of Portcullis: standard library only.

    python3 scripts/audit-verify.py < audit.jsonl
    python3 scripts/audit-verify.py --from-seq 5000 --from-hash <hash of 5000> < rest.jsonl
    python3 scripts/audit-verify.py --expect-head <head hash> < audit.jsonl

Lines may come in any order (the union of several instances' sink files, or one file a
CLI command appended to while an instance was writing its batch): they are checked in
seq order. Without --from-*, the records must start at seq 1; with them, at the seq after
--from-seq,
linked to --from-hash (the last record of an archived range, or of the previous sink
file). Lines alone cannot show that records were cut off the end: compare the head this
prints with the trail's own (`portcullis audit verify` prints it), or pass it as
--expect-head.

Exit 0 with "N records, chain intact up to seq B (head H)" ("N records after seq A, …"
with --from-seq A); 3 naming the
first broken seq (a hash mismatch, a gap, a broken link, an unknown hash version, or a
head other than --expect-head); 2 for bad arguments; 1 when the input cannot be read
(not JSON, a field missing). The encoding is described in docs/operations/audit.md.
"""
import argparse
import hashlib
import json
import re
import struct
import sys

GENESIS = "0" * 64
BROKEN = 3
UNREADABLE = 1


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


def a_hash(text):
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise argparse.ArgumentTypeError("a record hash is 64 lowercase hex digits")
    return text


def a_seq(text):
    try:
        seq = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("a seq is a whole number") from None
    if seq < 1:
        raise argparse.ArgumentTypeError("a seq is at least 1")
    return seq


def broken(message):
    print(f"chain BROKEN: {message}")
    sys.exit(BROKEN)


def main():
    parser = argparse.ArgumentParser(description="Re-verify the Portcullis audit chain.")
    parser.add_argument("--from-seq", type=a_seq, help="the lines start after this seq")
    parser.add_argument("--from-hash", type=a_hash, help="the hash of --from-seq's record")
    parser.add_argument("--expect-head", type=a_hash, help="the head the last line must have")
    args = parser.parse_args()
    if (args.from_seq is None) != (args.from_hash is None):
        parser.error("--from-seq and --from-hash go together")

    start = args.from_seq or 0
    prev, expected = (args.from_hash or GENESIS), start + 1
    try:
        records = [json.loads(line) for line in sys.stdin if line.strip()]
        records.sort(key=lambda r: r["seq"])
        for r in records:
            if r["seq"] != expected:
                broken(f"seq {expected}: missing (gap: the next record is seq {r['seq']})")
            if r["hash_version"] != 1:
                broken(f"seq {r['seq']}: unknown hash version {r['hash_version']}")
            if record_hash(r, r["prev_hash"]) != r["hash"]:
                broken(f"seq {r['seq']}: hash mismatch")
            if r["prev_hash"] != prev:
                broken(f"seq {r['seq']}: prev mismatch")
            prev, expected = r["hash"], expected + 1
    except (ValueError, KeyError, TypeError) as e:
        print(f"cannot read the trail: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(UNREADABLE)
    last = expected - 1
    if args.expect_head is not None and prev != args.expect_head:
        broken(f"seq {last + 1}: the lines end at seq {last} with head {prev}, not the expected head")
    after = f" after seq {start}" if start else ""
    print(f"{last - start} records{after}, chain intact up to seq {last} (head {prev})")


if __name__ == "__main__":
    main()
