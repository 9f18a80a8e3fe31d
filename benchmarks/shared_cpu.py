"""Two trainers on one CPU: how much a second training process slows a step, with PyTorch's default OpenMP spin
and with the short spin `import unitok` sets (unitok/cpu_share.py).

    python benchmarks/shared_cpu.py [--steps 8]

Each measurement is a fresh Python process that times `steps` steps of the `tiny` tokenizer trainer (batch 64,
fp32, after 2 warm-up steps) with all cores, alone or while a second process trains the same model in a loop. The
spin is set per process through GOMP_SPINCOUNT (libgomp, the OpenMP runtime of PyTorch's CPU wheels): 300000 is
libgomp's own default when no wait policy is set, which is what a plain PyTorch program gets; 3000 is unitok's.
Fair sharing of the cores would make a shared step 2x slower than a lone one; the ratios say how far each setting
is from that. (Run it on an otherwise idle machine: a third process skews every number.)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

DEFAULT_SPIN, UNITOK_SPIN = "300000", "3000"

CHILD = """
import sys, time
import unitok
from unitok.training.tokenizer_trainer import Trainer
trainer = Trainer.from_preset("tiny", data="shapes", overrides=["eval_every=0", "checkpoint_every=0", "cpu_bf16=off"])
if sys.argv[1] == "forever":
    while True:
        trainer.step()
steps = int(sys.argv[1])
for _ in range(2):
    trainer.step()
start = time.perf_counter()
for _ in range(steps):
    trainer.step()
print((time.perf_counter() - start) / steps)
"""


def _env(spin: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["GOMP_SPINCOUNT"] = spin
    return env


def step_seconds(spin: str, steps: int, beside: str | None = None) -> float:
    """Seconds per step of a trainer with this spin, alone or beside a looping trainer with spin `beside`."""
    other = None
    if beside is not None:
        other = subprocess.Popen([sys.executable, "-c", CHILD, "forever"], env=_env(beside),
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(20)                           # let it build its data and reach its training loop
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, str(steps)], env=_env(spin), capture_output=True,
                             text=True, check=True)
        return float(out.stdout.strip().splitlines()[-1])
    finally:
        if other is not None:
            other.kill()
            other.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    cases = [("alone, PyTorch's default spin", DEFAULT_SPIN, None),
             ("alone, unitok's spin", UNITOK_SPIN, None),
             ("beside a trainer, both default spin", DEFAULT_SPIN, DEFAULT_SPIN),
             ("beside a trainer, both unitok's spin", UNITOK_SPIN, UNITOK_SPIN),
             ("unitok's spin beside a default-spin trainer", UNITOK_SPIN, DEFAULT_SPIN),
             ("default spin beside a unitok-spin trainer", DEFAULT_SPIN, UNITOK_SPIN)]
    results = {}
    for label, spin, beside in cases:
        results[label] = step_seconds(spin, args.steps, beside)
        print(f"{label:48s} {results[label]:.3f} s/step", flush=True)
    alone = results["alone, PyTorch's default spin"]
    print(f"\nratio to a lone step with the default spin ({alone:.3f} s); fair sharing of the cores = 2.0x")
    for label, seconds in results.items():
        print(f"{label:48s} x{seconds / alone:.2f}")


if __name__ == "__main__":
    main()
