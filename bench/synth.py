"""Throughput of the synthetic domains: images/s per domain, one process.

Run single-threaded for a one-core figure:

    OMP_NUM_THREADS=1 python bench/synth.py [--size 256] [--n 100]
"""

from __future__ import annotations

import argparse
import time

from fsmeta.data.synth import DOMAINS, generate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--n", type=int, default=100, help="images per domain")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"size {args.size}, {args.n} images per domain")
    for domain in DOMAINS:
        generate(domain, 2, args.size, seed=args.seed + 1)  # warm caches (blur kernels, imports)
        start = time.perf_counter()
        _, masks = generate(domain, args.n, args.size, seed=args.seed)
        elapsed = time.perf_counter() - start
        print(f"{domain:14s} {args.n / elapsed:8.1f} images/s   foreground {masks.mean():.3f}")


if __name__ == "__main__":
    main()
