#!/usr/bin/env python3
"""Formats bench/fs.sh's JSON lines (stdin) as the Markdown tables of docs/benchmarks.md."""
import json
import sys

runs = {}  # (condition, phase) -> {label: result}
labels = []
for line in sys.stdin:
    if line.strip():
        r = json.loads(line)
        runs.setdefault((r["condition"], r["phase"]), {})[r["label"]] = r
        if r["label"] not in labels:
            labels.append(r["label"])


def table(title, cols, rows):
    print(f"\n{title}\n")
    print("| | " + " | ".join(cols) + " |")
    print("|---|" + "--:|" * len(cols))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")


def noisy(v, cond):
    """A mark on a quiet figure that other work disturbed (a third of a core or more)."""
    return f" (other work {v['background_cpus']:.1f} cores)" if cond == "quiet" and v.get("background_cpus", 0) >= 0.3 else ""


def bg(results):
    """The most cores' worth of other work seen during any measurement of a run."""
    vals = []
    for r in results:
        for v in list(r.get("qd_io", {}).values()) + list(r.get("io", {}).values()):
            vals.append(v.get("background_cpus", 0))
        if "getattr" in r:
            vals.append(r["getattr"].get("background_cpus", 0))
    return max(vals) if vals else 0


conditions = sorted({c for c, _ in runs}, key=lambda c: ["quiet", "busy"].index(c) if c in ["quiet", "busy"] else 9)
for cond in conditions:
    io = runs.get((cond, "io"), {})
    if io:
        cols = [l for l in labels if l in io]
        peers = [l for l in cols if not l.startswith("vsnap")]
        # vsnap on one request queue, and (vsnap-2q) on two where the driver uses two: the peers
        # offer one.
        mine = [l for l in ("vsnap", "vsnap-2q") if l in io] if peers else []
        rows = []
        for case in next(iter(io.values()))["qd_io"]:
            cells = []
            for l in cols:
                v = io[l]["qd_io"].get(case)
                if v is None:
                    cells.append("–")
                    continue
                cells.append(f"{v['iops'] / 1000:.0f}k/s, {v['lat_p50_us']:.0f} µs, {v['cpu_us']:.1f} µs CPU, {v['vcs_per_op']:.2f}+{v['ivcs_per_op']:.2f} cs, {v.get('interrupts_per_op', 0):.2f} irq" + noisy(v, cond))
            best = max((io[p]["qd_io"][case]["iops"] for p in peers), default=0)
            for l in mine:
                v = io[l]["qd_io"].get(case)
                cells.append(f"{v['iops'] / best:.2f}x" if v and best else "–")
            rows.append((case.replace("_", " "), cells))
        extra = [f"{l} / better peer" for l in mine]
        table(f"**{cond}** (other work: up to {bg(io.values()):.1f} cores): I/O, IOPS, median round trip, daemon CPU and "
              "voluntary+involuntary context switches and interrupts of the driver per request", cols + extra, rows)
    ops = runs.get((cond, "ops"), {})
    if ops:
        cols = [l for l in labels if l in ops]
        def cost(v):
            return f"{v['wall_us']} / {v['cpu_us']} ({v['vcs_per_op']:.2f}+{v['ivcs_per_op']:.2f})" + noisy(v, cond)
        rows = [
            ("getattr, µs wall / CPU (cs)", [cost(ops[l]["getattr"]) for l in cols]),
            ("lookup per component, µs wall / CPU (fit, depths 1-64)",
             [f"{ops[l]['lookup_fit']['wall_us']['per_component']} / {ops[l]['lookup_fit']['cpu_us']['per_component']}" for l in cols]),
            ("lookup depth 16, µs wall / CPU (cs)", [cost(ops[l]["lookup_path_depth"]["16"]) for l in cols]),
            ("create+release+unlink, µs wall / CPU (cs)", [cost(ops[l]["create_release_unlink"]) for l in cols]),
        ]
        for k in ["read_4k", "write_4k", "read_128k", "write_128k"]:
            rows.append((f"{k.replace('_', ' ')}, µs wall / CPU (cs)", [cost(ops[l]["io"][k]) for l in cols]))
        table(f"**{cond}** (other work: up to {bg(ops.values()):.1f} cores): one request at a time", cols, rows)
    floor = runs.get((cond, "floor"), {}).get("null-daemon")
    if floor and ops:
        rt = floor["round_trip"]
        print(f"\nThe least a LOOKUP round trip costs a daemon here ({cond}; `vsnap-fsfloor`: sleep on the kick, "
              f"one fstatat, signal): {rt['cpu_us']} µs of CPU, {rt['wall_us']} µs wall; the fstatat alone "
              f"{floor['fstatat_cpu_us']} µs. The kernel alone charges one thread {floor.get('pread_4k_cpu_us')} µs "
              f"per random 4k pread and {floor.get('pwrite_4k_cpu_us')} µs per 4k pwrite of data.bin: the most one "
              f"worker thread can serve is one request per that much CPU.")
def per_inode(r):
    return f"{(r['rss_kib_holding'] - r['rss_kib_idle']) * 1024 / max(r['held_inodes'], 1):.0f}"


def kernel(r):
    k = r.get("kernel_slab_bytes_per_inode")
    return "n/a" if k is None else f"{k:.0f}"


holds = sorted((p for c, p in runs if c == "quiet" and p.startswith("hold")),
               key=lambda p: int("".join(ch for ch in p if ch.isdigit()) or 0))
for phase in holds:
    hold = runs[("quiet", phase)]
    cols = [l for l in labels if l in hold]
    rows = [
        ("inodes held", [f"{hold[l]['held_inodes']}" + (f" ({hold[l]['lookup_error']})" if hold[l].get("lookup_error") else "") for l in cols]),
        ("fds holding them (idle)", [f"{hold[l]['fds_holding']} ({hold[l]['fds_idle']})" for l in cols]),
        ("RSS MiB holding them (idle)", [f"{hold[l]['rss_kib_holding'] / 1024:.1f} ({hold[l]['rss_kib_idle'] / 1024:.1f})" for l in cols]),
        ("RSS bytes per held inode", [per_inode(hold[l]) for l in cols]),
        ("kernel slab bytes per held inode (machine-wide growth)", [kernel(hold[l]) for l in cols]),
        ("first lookup, µs wall / CPU", [f"{hold[l]['first_lookup']['wall_us']} / {hold[l]['first_lookup']['cpu_us']}" for l in cols]),
    ]
    size = phase.split("-", 1)[1] if "-" in phase else ""
    table(f"**Holding {size} inodes** (quiet)", cols, rows)
