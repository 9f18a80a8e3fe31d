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
    out = run("benchmarks/quantizer.py", "--tokens", "1024", "--repeats", "1", "--codebook-size", "256")
    ratios = re.findall(r"unitok vs (\w+)\s*: (\S+)x faster, peak memory (\S+)x of", out)
    names = [name for name, _, _ in ratios]
    assert names[0] == "loop" and set(names) <= {"loop", "vqtorch"}, out
    for name, speed, memory in ratios:
        assert math.isfinite(float(speed)) and float(speed) > 0, (name, speed)
        assert math.isfinite(float(memory)) and float(memory) > 0, (name, memory)
    peaks = re.search(r"fp32 matmul peak .*: (\S+) GFLOP/s before the timings, (\S+) GFLOP/s after", out)
    assert peaks and all(math.isfinite(float(p)) and float(p) > 0 for p in peaks.groups()), out
    contenders = dict((name, (float(t), float(m))) for name, t, m in
                      re.findall(r"contender (\w+)\s*: (\S+)x unitok's time, (\S+)x its peak memory", out))
    assert sorted(contenders) == ["fsq", "lfq", "rvq", "simvq"], out
    assert all(math.isfinite(v) and v > 0 for pair in contenders.values() for v in pair), contenders


def test_throughput_benchmark_prints_each_mode_against_the_peak_of_its_precision():
    # aot_eager: the compiled path without a minute of C++ compilation (the trainers use inductor); fp32 only, as
    # bf16 autocast steps are covered by the step-profile and unified-model benchmark tests
    out = run("benchmarks/train_throughput.py", "--presets", "tiny", "--batch", "4", "--steps", "1",
              "--backend", "aot_eager", "--fp32-only")
    peaks = re.search(r"fp32 (\S+) -> (\S+), bf16 (\S+) -> (\S+) GFLOP/s", out)
    assert peaks and all(float(p) > 0 for p in peaks.groups()), out
    rows = re.findall(r"^tiny +(fp32|bf16) +(eager|compiled) +(\S+) +\S+ +\S+ +\S+ +(\S+)x +(\S+)x +(\S+)$", out, re.M)
    assert [(p, m) for p, m, *_ in rows] == [("fp32", "eager"), ("fp32", "compiled")], out
    for precision, mode, ms, of_own, of_fp32, compile_s in rows:
        assert float(ms) > 0 and float(of_own) > 0 and float(of_fp32) > 0, out
        assert (float(compile_s) > 0) == (mode == "compiled"), out   # only a compiled step reports compilation
        if precision == "fp32":
            assert of_own == of_fp32, out
    assert re.search(r"tiny +fp32 compiled against fp32 eager: \S+x step speed; against fp32 eager \S+x, "
                     r"compilation earned back (after \d+ steps|never)", out), out


def test_step_profile_splits_each_setting_into_regions_and_compares_them():
    out = run("benchmarks/step_profile.py", "--steps", "1", "--top", "3", "--batch", "8")
    for name in ("before", "fp32", "bf16"):
        block = out.split(f"\n{name}: median step", 1)[1].split("top operators", 1)[0]
        shares = [float(v) for v in re.findall(r"ms scaled +(\S+) %", block)]
        assert len(shares) == 6 and abs(sum(shares) - 100) < 1, block   # the six regions cover the step
    speeds = dict(re.findall(r"(before|fp32|bf16) (\S+)x", out.split("step speed against fp32:", 1)[1]))
    assert float(speeds["fp32"]) == 1.0 and float(speeds["before"]) > 0 and float(speeds["bf16"]) > 0, out


def test_image_pool_probe_prints_an_accuracy_per_pooling():
    out = run("benchmarks/image_pool.py", "--steps", "2", "--pools", "mean", "max")
    rows = re.findall(r"^(tokenizer|small CNN), (\w+) pool .*step 2: (\S+)", out, re.M)
    assert [(kind, pool) for kind, pool, _ in rows] == [("tokenizer", "mean"), ("tokenizer", "max"),
                                                        ("small CNN", "max"), ("small CNN", "mean")], out
    assert all(0.0 <= float(acc) <= 1.0 for _, _, acc in rows), out


def test_generator_benchmark_prints_cache_speedups_and_the_default_schedule():
    out = run("benchmarks/generator.py", "--batch", "4", "--steps", "1", "--sample-batch", "2")
    schedule = re.search(r"the default (\d+) steps: (\S+) min here", out)
    assert schedule and int(schedule.group(1)) > 0 and float(schedule.group(2)) > 0, out
    speedups = re.findall(r"cache (\S+)x faster", out)
    assert len(speedups) == 1 and float(speedups[0]) > 0, out


def test_mllm_benchmark_prints_cache_and_bf16_ratios():
    out = run("benchmarks/mllm.py", "--batch", "1", "--train-batch", "3", "--steps", "1")
    cache = re.search(r"KV cache speed-up: caption x(\S+), t2i x(\S+)", out)
    assert cache and all(float(v) > 0 for v in cache.groups()), out
    bf16 = re.search(r"bf16 autocast \(cpu_bf16=on\): (\S+) s here, x(\S+) against fp32", out)
    assert bf16 and float(bf16.group(1)) > 0 and float(bf16.group(2)) > 0, out
