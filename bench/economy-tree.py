#!/usr/bin/env python3
"""The content of the diff-economy base image, the same on every run (seeded): a 64 MiB file of
random bytes (`big`) and a tree of 5,000 small text files (`tree/`, sizes log-normal around
2 KiB like a source checkout) with the same tree as a tar archive (`tree.tar`).
Usage: economy-tree.py DIR"""
import io
import os
import random
import sys
import tarfile

out = sys.argv[1]
rng = random.Random(2549)
os.makedirs(os.path.join(out, "tree"), exist_ok=True)
with open(os.path.join(out, "big"), "wb") as f:
    for _ in range(64):
        f.write(rng.randbytes(1 << 20))
words = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4000)]
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
    for i in range(5000):
        rel = f"d{i % 50:02}/s{i % 7}/f{i:04}.txt"
        size = int(min(max(rng.lognormvariate(7.6, 1.0), 40), 64 << 10))
        text = bytearray()
        while len(text) < size:
            text += b" ".join(rng.choice(words) for _ in range(12)) + b"\n"
        data = bytes(text[:size])
        path = os.path.join(out, "tree", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        info = tarfile.TarInfo(rel)
        info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
        tar.addfile(info, io.BytesIO(data))
with open(os.path.join(out, "tree.tar"), "wb") as f:
    f.write(buf.getvalue())
