"""Sharing the CPU: how unitok's threads wait, and what else is using the cores right now.

    >>> from unitok.cpu_share import cpu_usage
    >>> usage = cpu_usage()                       # samples /proc for 0.4 s (Linux; None elsewhere)
    >>> usage.other_cores, usage.cores            # e.g. (1.93, 2): another process keeps both cores nearly busy
    >>> print(usage.describe())                   # one line: what is busy, how much slower to expect, what to do

**Why the wait policy.** PyTorch's CPU kernels run on an OpenMP thread pool (GNU libgomp in the PyPI wheels). When
a thread reaches the end of a parallel region early it *spins* for its partner, by default for 300 000 rounds,
before it sleeps. On a quiet machine that saves a wake-up; when two training processes share two cores, each
spinning thread burns the time slice that the thread it waits for needs, and a step can take ten times longer
instead of twice (measured with two `tiny` trainers on 2 cores: 5.7 s a step for a default-spinning process next
to a polite one, 0.50 s alone). `GOMP_SPINCOUNT=3000` keeps the short spin that a quiet machine profits from and
gives the core away soon enough when it is shared: alone 0.48 s a step, beside a second trainer 1.09 s (2.2x, where
fair sharing is 2x). `OMP_WAIT_POLICY=PASSIVE` shares as well but costs 13 % on a quiet machine (0.57 s).

The setting only takes effect before torch is first imported (libgomp reads it when it loads), so `import unitok`
applies it first thing; an explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY in the environment always wins.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

SPIN_COUNT = "3000"


def apply_wait_policy() -> bool:
    """Set GOMP_SPINCOUNT for this process unless torch is already loaded or the user chose a policy.
    -> True if it was set now."""
    if "torch" in sys.modules or "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def wait_policy_note() -> Optional[str]:
    """A line for a process whose torch was imported before unitok (so the short spin could not be set), else None:
    such a process spins at every OpenMP barrier and, beside a polite one, slows to a crawl (13x measured)."""
    if "GOMP_SPINCOUNT" in os.environ or "OMP_WAIT_POLICY" in os.environ:
        return None
    return ("note: torch was imported before unitok, so this process keeps PyTorch's long OpenMP spin and shares a "
            "busy CPU badly; restart the kernel and import unitok (or unitok_widgets) before torch")


@dataclass
class Process:
    pid: int
    name: str            # a short description: "a notebook kernel", "unitok train", "python", "chromium", ...
    cores: float         # cores it used while sampled


@dataclass
class CpuUsage:
    """What the cores did during a short sample. `other_cores`: cores kept busy by every process but this one."""

    cores: int
    other_cores: float
    busy: list = field(default_factory=list)           # Process entries using at least 0.15 cores, busiest first
    idle_kernels: int = 0                               # other notebook kernels open but not computing

    @property
    def slowdown(self) -> float:
        """How many times longer work on all cores takes than on the idle machine, if the scheduler shares fairly:
        our `cores` threads beside `other_cores` busy ones get cores / (cores + other) of the machine."""
        return 1.0 + self.other_cores / max(self.cores, 1)

    def describe(self) -> str:
        """One line for a notebook's set-up cell or a command's start."""
        kernels = (f"; {self.idle_kernels} other notebook kernel{'s are' if self.idle_kernels > 1 else ' is'} open: "
                   "shut down the ones you are done with (Kernel > Shut Down Kernel)") if self.idle_kernels else ""
        if self.other_cores < 0.3:
            return f"CPU: {self.cores} cores, quiet (other processes use {self.other_cores:.1f}){kernels}"
        who = ", ".join(f"{p.name} {p.cores:.1f}" for p in self.busy[:3]) or "several small processes"
        return (f"CPU busy: {self.other_cores:.1f} of {self.cores} cores are used by other work ({who}); expect the "
                f"times in this notebook's table to take about {self.slowdown:.1f}x longer. Stop the other work "
                f"(a training cell or kernel in another notebook: Kernel > Shut Down Kernel) or wait for it"
                + (kernels.replace("; ", "; also ", 1) if kernels else ""))


def _clock_ticks() -> float:
    return float(os.sysconf("SC_CLK_TCK"))


def _process_jiffies() -> dict:
    """{pid: user + system clock ticks so far} for every process we may read."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            out[int(entry.name)] = int(fields[11]) + int(fields[12])      # utime, stime (fields 14 and 15)
        except (OSError, IndexError, ValueError):
            continue
    return out


def _describe_process(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return "a process"
    text = " ".join(argv)
    if "ipykernel" in text:
        return "a notebook kernel"
    if "pytest" in text:
        return "pytest"
    if "unitok" in text:
        words = [a for a in argv if not a.startswith("-")]
        for i, word in enumerate(words):
            if word.endswith("unitok") or word.endswith("unitok.cli"):
                return "unitok " + (words[i + 1] if i + 1 < len(words) else "")
        return "a unitok process"
    return os.path.basename(argv[0]) if argv else "a process"


def _is_kernel(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ipykernel" in f.read()
    except OSError:
        return False


def cpu_usage(seconds: float = 0.4, own_pid: Optional[int] = None) -> Optional[CpuUsage]:
    """Sample every process's CPU time over `seconds` and report what the others used (this process, and the
    process that started it when it is a kernel's launcher, do not count). None where /proc is missing."""
    if not os.path.isdir("/proc/self"):
        return None
    own = os.getpid() if own_pid is None else own_pid
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    start, t0 = _process_jiffies(), time.perf_counter()
    time.sleep(seconds)
    end, t1 = _process_jiffies(), time.perf_counter()
    ticks = _clock_ticks() * (t1 - t0)
    used = {pid: (end[pid] - start[pid]) / ticks for pid in end if pid in start and pid != own}
    busy = sorted((Process(pid, _describe_process(pid), c) for pid, c in used.items() if c >= 0.15),
                  key=lambda p: -p.cores)
    busy_pids = {p.pid for p in busy}
    idle_kernels = sum(1 for pid in used if pid not in busy_pids and _is_kernel(pid))
    return CpuUsage(cores=cores, other_cores=round(min(sum(used.values()), float(cores)), 2), busy=busy,
                    idle_kernels=idle_kernels)
