#!/usr/bin/env python3
"""Formats bench/fs.sh's JSON lines (stdin) as the Markdown table of docs/benchmarks.md."""
import json
import sys

# One line per (label, phase): merge them per label, in order of appearance.
merged = {}
for line in sys.stdin:
    if line.strip():
        r = json.loads(line)
        merged.setdefault(r["label"], {}).update(r)
runs = list(merged.values())
rows = [
    ("inodes held (of 100,100 looked up)", lambda r: f"{r['held_inodes']}" + (f" ({r['lookup_error']})" if r.get("lookup_error") else "")),
    ("fds holding them (idle)", lambda r: f"{r['fds_holding']} ({r['fds_idle']})"),
    ("RSS MiB holding them (idle)", lambda r: f"{r['rss_kib_holding'] / 1024:.1f} ({r['rss_kib_idle'] / 1024:.1f})"),
    ("first lookup, µs wall / CPU", lambda r: f"{r['first_lookup']['wall_us']} / {r['first_lookup']['cpu_us']}"),
    ("getattr, µs wall / CPU", lambda r: f"{r['getattr']['wall_us']} / {r['getattr']['cpu_us']}"),
]
for d in ["1", "2", "4", "8", "16", "64"]:
    rows.append((f"path lookup depth {d}, µs wall / CPU", lambda r, d=d: f"{r['lookup_path_depth'][d]['wall_us']} / {r['lookup_path_depth'][d]['cpu_us']}"))
rows += [
    ("path lookup µs wall: constant + per component", lambda r: f"{r['lookup_fit']['wall_us']['constant']} + {r['lookup_fit']['wall_us']['per_component']}"),
    ("path lookup µs CPU: constant + per component", lambda r: f"{r['lookup_fit']['cpu_us']['constant']} + {r['lookup_fit']['cpu_us']['per_component']}"),
    ("create+release+unlink, µs wall / CPU", lambda r: f"{r['create_release_unlink']['wall_us']} / {r['create_release_unlink']['cpu_us']}"),
]
for k in ["read_4k", "write_4k", "read_128k", "write_128k"]:
    rows.append((f"{k.replace('_', ' ')}, µs wall / CPU", lambda r, k=k: f"{r['io'][k]['wall_us']} / {r['io'][k]['cpu_us']}"))
print("| | " + " | ".join(r["label"] for r in runs) + " |")
print("|---|" + "--:|" * len(runs))
for name, f in rows:
    print(f"| {name} | " + " | ".join(f(r) for r in runs) + " |")
