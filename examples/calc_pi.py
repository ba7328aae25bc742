"""Estimate pi by the Monte-Carlo method (the command-line example).

capsula monitor -i calc-pi -- python examples/calc_pi.py -n 100000 --seed 42
"""

import argparse
import random
from pathlib import Path


def estimate_pi(n: int, seed: int) -> float:
    rng = random.Random(seed)
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4 * inside / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=100_000, help="number of samples")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    pi = estimate_pi(args.n, args.seed)
    (Path(__file__).parent / "pi.txt").write_text(f"{pi}\n")
    print(pi)


if __name__ == "__main__":
    main()
