"""Where a run's time goes: training steps, compilation and evaluations, each in wall seconds and scaled to a laptop.

A recipe's budget is written for a laptop whose fp32 2048-cube matmul runs at REFERENCE_GFLOPS. A wall time on
another machine, or on a busy one, is scaled by the matmul peak measured next to it (`unitok.training.machine`):

    scaled = wall seconds x measured peak / REFERENCE_GFLOPS

    >>> clock = RunClock()
    >>> clock.count("train", 0.5, gflops=384.0)     # a 0.5 s step on a machine twice the laptop's speed
    >>> clock.count("eval", 2.0, gflops=192.0)
    >>> clock.summary()["total_seconds_at_192_gflops"]
    3.0

Compilation (a compiled model's first steps) and evaluations count towards the recipe's time: a faster step that
needs a minute of compilation, or evaluations that take as long as training, do not make a recipe faster.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .machine import REFERENCE_GFLOPS

__all__ = ["RunClock", "PARTS"]

PARTS = ("train", "compile", "eval")


@dataclasses.dataclass
class RunClock:
    """Seconds per part of a run (`PARTS`), wall and scaled to REFERENCE_GFLOPS (scaled stays 0 where no peak is
    measured, e.g. on a GPU)."""
    train_seconds: float = 0.0
    compile_seconds: float = 0.0
    eval_seconds: float = 0.0
    train_scaled_seconds: float = 0.0
    compile_scaled_seconds: float = 0.0
    eval_scaled_seconds: float = 0.0

    def count(self, part: str, seconds: float, gflops: Optional[float]) -> None:
        """Add `seconds` of wall time spent on `part`, measured beside a matmul peak of `gflops` (None: unknown)."""
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        setattr(self, f"{part}_seconds", getattr(self, f"{part}_seconds") + seconds)
        if gflops:
            scaled = f"{part}_scaled_seconds"
            setattr(self, scaled, getattr(self, scaled) + seconds * gflops / REFERENCE_GFLOPS)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "RunClock":
        """From `state_dict()`, or from a checkpoint written before the clock (flat train/scaled/compile seconds)."""
        if "clock" in state:
            return cls(**state["clock"])
        return cls(train_seconds=float(state.get("train_seconds", 0.0)),
                   train_scaled_seconds=float(state.get("scaled_seconds", 0.0)),
                   compile_seconds=float(state.get("compile_seconds", 0.0)))

    def summary(self) -> dict:
        """summary.json's time fields: each part's wall seconds (compilation only when there was some), the scaled
        training time, and the scaled total that a recipe's budget is checked against."""
        at = f"at_{REFERENCE_GFLOPS:.0f}_gflops"
        total = self.train_scaled_seconds + self.compile_scaled_seconds + self.eval_scaled_seconds
        return {"train_seconds": round(self.train_seconds, 2),
                f"train_seconds_{at}": round(self.train_scaled_seconds, 2),
                "eval_seconds": round(self.eval_seconds, 2),
                **({"compile_seconds": round(self.compile_seconds, 2)} if self.compile_seconds else {}),
                f"total_seconds_{at}": round(total, 2)}
