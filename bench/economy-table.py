#!/usr/bin/env python3
"""Formats bench/economy.sh's TSV (stdin) as the Markdown table of docs/diff-economy.md."""
import csv
import sys

rows = list(csv.DictReader(sys.stdin, delimiter="\t"))
mib = lambda b: f"{int(b) / (1 << 20):.2f}"


def ratio(a, b, digits=2):
    a, b = int(a), int(b)
    return "n/a" if b == 0 else f"{a / b:.{digits}f}"


print("| workload / knob | vsnap diff data MiB | minimum MiB | vsnap ÷ min | stored, zstd:3 MiB | stored, zstd:3 + dedupe MiB "
      "| stored ÷ min | dirty blk | zero blk | plain dirty bitmap MiB | vsnap ÷ plain | whole-block zeros MiB | vsnap ÷ whole-block |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
for r in rows:
    stored = r.get("stored", r["diff_data"])
    zstd_only = r.get("stored_zstd_only", stored)
    print(f"| {r['row']} | {mib(r['diff_data'])} | {mib(r['min_data'])} | {ratio(r['diff_data'], r['min_data'], 3)} "
          f"| {mib(zstd_only)} | {mib(stored)} | {ratio(stored, r['min_data'], 3)} "
          f"| {r['dirty']} | {r['zero']} | {mib(r['plain_dirty'])} | {ratio(r['diff_data'], r['plain_dirty'])} "
          f"| {mib(r['aligned_zero'])} | {ratio(r['diff_data'], r['aligned_zero'])} |")
