"""How much faster is the BLAS `blas: auto` picks than MLX's bundled reference BLAS (Linux CPU backend)?

Each round runs the same probe in two fresh processes, one with the chosen library's environment (the
OpenBLAS preload a worker gets), one with the reference BLAS, alternating which goes first: the best of
5 timed 1024x1024 float32 matmuls, in GFLOPS. Prints every round and the ratio of the medians (the
speed goal of docs/ — OpenBLAS several times faster — is checked here, not by a timed test).

    .venv/bin/python bench/blas.py [--rounds 5]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

from ftctl.adapters import blas

PROBE = r"""
import json, time
import mlx.core as mx
mx.set_default_device(mx.cpu)
a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
mx.eval(a @ b)
best = float("inf")
for _ in range(5):
    t = time.perf_counter(); mx.eval(a @ b); best = min(best, time.perf_counter() - t)
print(json.dumps({"gflops": 2 * 1024**3 / best / 1e9}))
"""


def gflops(choice: blas.Choice) -> float:
    p = subprocess.run(
        [sys.executable, "-c", PROBE],
        env={**os.environ, **choice.env},
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return json.loads(p.stdout.strip().splitlines()[-1])["gflops"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    rounds = ap.parse_args().rounds
    fast, ref = blas.choose("auto"), blas.choose("reference")
    print(
        f"auto: {fast.kind} {fast.library or ''} ({fast.why or 'chosen'}); reference: {ref.library}"
    )
    got, base = [], []
    for i in range(rounds):
        pair = [(fast, got), (ref, base)]
        for choice, out in pair if i % 2 == 0 else pair[::-1]:
            out.append(gflops(choice))
        print(f"round {i + 1}: auto {got[-1]:.1f} GFLOPS, reference {base[-1]:.1f} GFLOPS")
    print(
        f"median: auto {statistics.median(got):.1f}, reference {statistics.median(base):.1f} GFLOPS; "
        f"ratio {statistics.median(got) / statistics.median(base):.1f}x"
    )


if __name__ == "__main__":
    main()
