"""Sharing the CPU: the OpenMP wait policy is set before torch loads, and `cpu_usage` sees another busy process."""
import os
import subprocess
import sys
import time

from unitok.cpu_share import SPIN_COUNT, CpuUsage, Process, cpu_usage


def test_import_unitok_sets_a_short_spin_unless_the_user_chose_one():
    code = "import os, unitok, torch; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == SPIN_COUNT
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "PASSIVE"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"                   # the user's policy wins
    late = ("import os, torch, unitok; from unitok.cpu_share import wait_policy_note; "
            "print(os.environ.get('GOMP_SPINCOUNT')); print(wait_policy_note())")
    out = subprocess.run([sys.executable, "-c", late], env=env, capture_output=True, text=True, check=True)
    spin, note = out.stdout.strip().splitlines()
    assert spin == "None" and "torch was imported before unitok" in note     # too late: said, not pretended


def test_cpu_usage_sees_a_busy_process_and_says_what_to_expect():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        usage = cpu_usage(seconds=0.6)
    finally:
        busy.kill()
        busy.wait()
    assert usage is not None and usage.cores >= 1
    mine = [p for p in usage.busy if p.pid == busy.pid]
    assert mine and mine[0].cores > 0.2, usage           # a spinning child gets a share even on a busy machine
    assert usage.other_cores >= mine[0].cores - 0.01
    assert usage.describe().startswith("CPU busy: ")


def test_describe_quiet_and_busy_lines():
    quiet = CpuUsage(cores=2, other_cores=0.1, idle_kernels=2)
    assert quiet.describe() == ("CPU: 2 cores, quiet (other processes use 0.1); 2 other notebook kernels are open: "
                                "shut down the ones you are done with (Kernel > Shut Down Kernel)")
    busy = CpuUsage(cores=2, other_cores=2.0, busy=[Process(1, "a notebook kernel", 1.1), Process(2, "unitok train", 0.9)])
    assert busy.slowdown == 2.0
    line = busy.describe()
    assert "2.0 of 2 cores are used by other work (a notebook kernel 1.1, unitok train 0.9)" in line
    assert "about 2.0x longer" in line and "\n" not in line
