"""Estimate pi by the Monte-Carlo method (the decorator example).

python examples/calc_pi_dec.py
"""

import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, nothing installed

import capsula


@capsula.monitor(include_return_value=True, items=("calc-pi-dec",))
def calc_pi(n: int, seed: int = 42, *, fail: bool = False) -> float:
    if fail:
        raise ValueError("asked to fail")
    rng = random.Random(seed)
    inside = sum(1 for _ in range(n) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    pi = 4 * inside / n
    (Path(__file__).parent / "pi_dec.txt").write_text(f"{pi}\n")
    print("capsule:", capsula.get_capsule_dir())
    return pi


if __name__ == "__main__":
    print(calc_pi(100_000, fail=False))
