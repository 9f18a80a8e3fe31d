"""The benchmark scripts keep working at tiny sizes and print finite ratios (nothing here asserts on time)."""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Each test starts the benchmark scripts in fresh interpreters (and the quantizer one spawns one more per
# contender for its memory measurement): a minute or more on a small machine.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_quantizer_benchmark_prints_finite_ratios():
    out = run("benchmarks/quantizer.py", "--tokens", "1024", "--repeats", "1")
    ratios = re.findall(r"unitok vs (\w+)\s*: (\S+)x faster, peak memory (\S+)x of", out)
    names = [name for name, _, _ in ratios]
    assert names[0] == "loop" and set(names) <= {"loop", "vqtorch"}, out
    for name, speed, memory in ratios:
        assert math.isfinite(float(speed)) and float(speed) > 0, (name, speed)
        assert math.isfinite(float(memory)) and float(memory) > 0, (name, memory)
    peaks = re.search(r"fp32 matmul peak .*: (\S+) GFLOP/s before the timings, (\S+) GFLOP/s after", out)
    assert peaks and all(math.isfinite(float(p)) and float(p) > 0 for p in peaks.groups()), out


def test_throughput_benchmark_prints_peak_ratio():
    out = run("benchmarks/train_throughput.py", "--presets", "tiny", "--batch", "4", "--steps", "1")
    assert "matmul peak" in out and "images/s" in out
    fractions = re.findall(r"(\S+) x matmul peak", out)
    assert fractions and all(math.isfinite(float(f)) and float(f) > 0 for f in fractions), out


def test_image_pool_probe_prints_an_accuracy_per_pooling():
    out = run("benchmarks/image_pool.py", "--steps", "2", "--pools", "mean", "max")
    rows = re.findall(r"^(tokenizer|small CNN), (\w+) pool .*step 2: (\S+)", out, re.M)
    assert [(kind, pool) for kind, pool, _ in rows] == [("tokenizer", "mean"), ("tokenizer", "max"),
                                                        ("small CNN", "max"), ("small CNN", "mean")], out
    assert all(0.0 <= float(acc) <= 1.0 for _, _, acc in rows), out
