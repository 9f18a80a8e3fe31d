"""The benchmark scripts keep working (tiny sizes; nothing here asserts on time)."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args):
    res = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_quantizer_benchmark_prints_ratios():
    out = run("benchmarks/quantizer.py", "--tokens", "1024", "--repeats", "1")
    assert "unitok vs loop" in out and "x faster" in out and "peak memory" in out


def test_throughput_benchmark_prints_peak_ratio():
    out = run("benchmarks/train_throughput.py", "--presets", "tiny", "--batch", "4", "--steps", "1")
    assert "matmul peak" in out and "x matmul peak" in out and "images/s" in out
