"""Shared helpers for benchmarks: each prints ratios against a baseline timed in the same process."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def pop_option(argv: list[str], name: str, default: str) -> str:
    """The value after `name` in `argv` (both removed from it), else `default`."""
    if name not in argv:
        return default
    i = argv.index(name)
    value = argv[i + 1]
    del argv[i : i + 2]
    return value


def timed(fn, repeat: int = 1):
    """Best wall time of `repeat` runs, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def fp32_roofline(dtype: str = "float32") -> tuple[float, float]:
    """Seconds for one 2048x2048 matmul in `dtype` (best of 10) and the FLOP/s it reaches (2·2048³ FLOP):
    the roofline the benchmarks state their shares of (fp32 by default; "bfloat16" for the bf16 one)."""
    import torch

    dt = getattr(torch, dtype)
    a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
    a @ b
    mm_s, _ = timed(lambda: a @ b, 10)
    return mm_s, 2 * 2048**3 / mm_s


def report(name: str, baseline_s: float, rows: list[tuple[str, float]], unit_count: float, unit: str):
    print(f"== {name}")
    print(f"{'variant':<34} {'seconds':>8} {unit + '/s':>12} {'vs baseline':>12}")
    print(f"{'baseline':<34} {baseline_s:>8.2f} {unit_count / baseline_s:>12.1f} {1.0:>12.3f}")
    for label, s in rows:
        print(f"{label:<34} {s:>8.2f} {unit_count / s:>12.1f} {baseline_s / s:>12.3f}")
