"""The trainer base: everything a run folder promises, written once for every model.

A model's trainer (the tokenizer's, the generator's, the unified model's) subclasses `TrainerBase` and says only
what differs:

    class MyTrainer(TrainerBase):
        command = "unitok train-my-model"          # named in the lock file and in messages
        progress_name = "train my model"            # the tqdm bar's label
        best_metric, best_mode = "acc_test", "max"  # which evaluation picks out/best/

        def __init__(self, config, data, out_dir=None, resume=False, overwrite=False):
            super().__init__(config)                # rank, device, bf16 choice, seeds
            self.data = data
            model = MyModel().to(self.device)
            self.start_run(model, out_dir=out_dir, resume=resume, overwrite=overwrite)

        def batch_for_step(self, step): ...          # a pure function of (seed, step)
        def loss_terms(self, batch): ...             # {"loss": total (backpropagated), "other": term, ...}
        def evaluation(self): ...; def save_model(self, directory): ...; def run_config(self): ...

What the base owns (and the tests check for every subclass, tests/training/test_run_rules.py):
- the run folder: claimed (refused if it holds another run unless resume / overwrite; `unitok.training.runs`),
  locked while the trainer lives, `config.json` written only when its text changes;
- the checkpoint: `state_dict` / atomic `save_checkpoint` / `last_checkpoint_step` / `load_checkpoint`, which
  restores weights, optimizer, step, RNG, histories and truncates the logs to the checkpoint (a crash after it);
- the lr schedule (`lr_at`), the optimizer (AdamW, decay on matrices only, fused where it is available), gradient
  clipping, the non-finite-loss stop (before the bad update), callbacks, `step()` / `run(n)` with tqdm, bf16
  autocast, DDP under torchrun with rank-0 writes, Ctrl-C at a step boundary, the summary;
- time (`clock`, a `unitok.training.clock.RunClock`): training steps, compilation (a compiled model's first
  steps) and evaluations, each also scaled to a laptop with REFERENCE_GFLOPS fp32 matmul from the matmul peak
  measured every 25 steps on the CPU, so a busy machine shows.

Exact resume: the data order is a pure function of (seed, step) (`StepBatchSampler`), every random draw a step
makes comes from the global torch RNG, whose state the checkpoint carries.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from ..checkpoint import atomic_write, load_state_dict_checked, read_torch
from .clock import RunClock
from .machine import matmul_peak, model_lock, pick_device, training_autocast, uses_bf16
from .resume import saved_step
from .runs import RunLock, atomic_write_text, prepare_run_folder, write_log_if_changed

__all__ = ["TrainerBase", "NonFiniteLossError", "StepBatchSampler", "lr_at", "seed_everything",
           "distributed_env", "TrainingInterrupted"]

PEAK_EVERY = 25          # steps between two matmul-peak measurements (about 10 ms each on a 2-core CPU)
COMPILING_STEPS = 2      # with compile: the steps of each process timed as compilation (compile_seconds)


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term becomes NaN/Inf; the weights are left as they were before that step."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (or ■ in Jupyter) during `run`: raised after the step in progress and its checkpoint. In Jupyter its
    message is the whole error output (IPython's `_render_traceback_`); as an error it still stops Run All."""

    def _render_traceback_(self) -> list:
        return [str(self) or "interrupted"]


# ---------------------------------------------------------------------------------------------------------------
# data order, schedule, seeds, torchrun
# ---------------------------------------------------------------------------------------------------------------
class StepBatchSampler(torch.utils.data.Sampler):
    """Yields index lists for steps start_step, start_step + 1, ...; each epoch is a seeded permutation.

    Global sample position p = step * batch * world + rank * batch + j; epoch = p // n; index = perm_epoch[p % n].
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                 start_step: int = 0):
        if num_items < 1:
            raise ValueError("the training dataset is empty: it yields no items (check its path / split)")
        self.n, self.batch, self.seed = num_items, batch_size, seed
        self.rank, self.world, self.start_step = rank, world_size, start_step
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def indices_for_step(self, step: int) -> List[int]:
        first = (step * self.world + self.rank) * self.batch
        return [int(self._permutation(p // self.n)[p % self.n]) for p in range(first, first + self.batch)]

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices_for_step(step)
            step += 1

    def __len__(self):  # infinite; DataLoader only needs it for len(loader), which we never call
        return 2 ** 62


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over cfg.warmup_fraction of cfg.steps, then cosine from cfg.lr down to cfg.min_lr_ratio * lr."""
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    """One seed for Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def distributed_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


class _DeferredInterrupt:
    """Within `run`, Ctrl-C sets a flag instead of raising mid-step; a second Ctrl-C raises at once. Only in the
    main thread (a notebook's dashboard trains in a thread, where signals cannot be caught)."""

    def __init__(self):
        self.requested, self._previous = False, None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:   # the second press: stop now
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


# ---------------------------------------------------------------------------------------------------------------
# the base
# ---------------------------------------------------------------------------------------------------------------
class TrainerBase:
    """Step-through training of one nn.Module with a run folder. See the module docstring for what a subclass
    defines. Attributes every trainer has: model, config, device, optimizer, step_count, history (one dict per step),
    eval_history, train_seconds, scaled_seconds, out_dir, callbacks."""

    command = "unitok train"
    progress_name = "train"
    best_metric: Optional[str] = None     # evaluation key that selects out/best/ (None: no best/)
    best_mode = "max"                      # "max" or "min"
    no_decay_suffixes: tuple = ()          # parameters (besides vectors) kept free of weight decay
    find_unused_parameters = False         # DDP: True when some parameters get no gradient in a step

    def __init__(self, config):
        self.config = config
        self.rank, self.world_size, local_rank = distributed_env()
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and config.device in ("auto", "cuda") else "gloo"
            dist.init_process_group(backend)
        self.device = pick_device(config.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.bf16 = uses_bf16(self.device, config.amp, config.cpu_bf16)   # checks the choice before any work
        seed_everything(config.seed)
        self.out_dir: Optional[Path] = None
        self._lock: Optional[RunLock] = None

    # ------------------------------------------------------------------ what a subclass defines
    def batch_for_step(self, step: int):
        """The batch of training step `step` (0-based): a pure function of (seed, step)."""
        raise NotImplementedError

    def loss_terms(self, batch) -> Dict[str, torch.Tensor]:
        """Forward pass (call `self.autocast()` around it) -> {"loss": the total to backpropagate, other terms...};
        every term is logged. Runs in train mode, inside the model's lock."""
        raise NotImplementedError

    def after_update(self, batch) -> dict:
        """Anything after the optimizer step (a second optimizer, clamps, statistics) -> extra metrics."""
        return {}

    def step_metrics(self, batch, terms: Dict[str, float], seconds: float) -> dict:
        """Extra per-step metrics from the batch and the logged terms (e.g. images per second)."""
        return {}

    def evaluation(self) -> dict:
        """An evaluation pass -> {metric: value}."""
        return {}

    def save_model(self, directory: Union[str, Path]) -> Path:
        """Write the model (weights + config) to `directory`, the way its from_pretrained reads it."""
        raise NotImplementedError

    def run_config(self) -> dict:
        """The run's config.json: every setting that makes the run what it is."""
        raise NotImplementedError

    def run_files(self) -> Dict[str, str]:
        """Other text files that describe the run (name -> text), written next to config.json."""
        return {}

    def extra_state(self) -> dict:
        """Model-specific state for the checkpoint (trackers, a discriminator...)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned."""

    def progress_postfix(self, metrics: dict) -> dict:
        """What the tqdm bar shows every log_every steps."""
        return {"loss": f"{metrics['loss']:.3f}"}

    def summary_fields(self) -> dict:
        """Model-specific entries of summary.json."""
        return {}

    # ------------------------------------------------------------------ set-up
    def start_run(self, model: nn.Module, *, out_dir=None, resume: bool = False, overwrite: bool = False) -> None:
        """Claim the run folder, build the optimizer and the training wrapper (DDP, compile), resume from the
        folder's checkpoint when asked, and write config.json. Call at the end of the subclass's __init__."""
        self.model = model
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None and self.is_main:   # one run per folder, one process per run (unitok.training.runs)
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite, command=self.command)
            self._lock = RunLock(self.out_dir, self.command).acquire()
            weakref.finalize(self, self._lock.release)
        self.optimizer = self.build_optimizer()
        self.step_count, self.clock = 0, RunClock()
        self.matmul_gflops: Optional[float] = None
        self.history: List[dict] = []
        self.eval_history: List[dict] = []
        self.best_score = -math.inf if self.best_mode == "max" else math.inf
        self.callbacks: Dict[str, List[Callable]] = {"step": [], "eval": []}
        self.train_model: nn.Module = self.model          # what the forward pass calls (DDP / compiled wrapper)
        if self.world_size > 1:
            self.train_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=self.find_unused_parameters)
        # a compiled model compiles during its first steps (the second recompiles once when shapes vary): those
        # steps are shown and timed as compilation, not as training
        self.compiling_steps = 0
        if getattr(self.config, "compile", False):
            self.train_model = torch.compile(self.train_model)
            self.compiling_steps = COMPILING_STEPS
        if resume and self.out_dir is not None and (self.out_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.out_dir / "checkpoint.pt")
        if self.is_main and self.out_dir is not None:
            files = {"config.json": json.dumps(self.run_config(), indent=2), **self.run_files()}
            for name, text in files.items():
                path = self.out_dir / name
                if not path.exists() or path.read_text() != text:
                    atomic_write_text(path, text)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW with weight decay on matrices only: vectors (biases, norms, scales) and the parameters whose names
        end in `no_decay_suffixes` (positions, learned null conditions) are not pulled towards zero."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            vector_like = p.ndim < 2 or name.endswith(self.no_decay_suffixes)
            (no_decay if vector_like else decay).append(p)
        cfg = self.config
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 # one kernel instead of ~12 ops per tensor: ~7x faster on the CPU, and on CUDA
                                 fused=self.device.type in ("cuda", "cpu"))

    def close(self) -> None:
        """Release the run folder's lock (also done when the trainer is garbage-collected or the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast for the forward pass where the config asks for it (`unitok.training.machine`)."""
        return training_autocast(self.device, self.config.amp, self.config.cpu_bf16, model=self.model)

    def add_callback(self, event: str, fn: Callable) -> None:
        """event "step": fn(trainer, metrics) after every step; "eval": fn(trainer, results) after evaluate()."""
        if event not in self.callbacks:
            raise ValueError(f"event must be one of {sorted(self.callbacks)}, got {event!r}")
        self.callbacks[event].append(fn)

    def remove_callback(self, event: str, fn: Callable) -> None:
        """Undo `add_callback` (no error if fn was not registered)."""
        if fn in self.callbacks.get(event, []):
            self.callbacks[event].remove(fn)

    def eval_due(self) -> bool:
        """True right after a step whose number is a multiple of config.eval_every (what `run` follows)."""
        return bool(self.config.eval_every) and self.step_count % self.config.eval_every == 0

    def checkpoint_due(self) -> bool:
        return bool(self.config.checkpoint_every) and self.step_count % self.config.checkpoint_every == 0

    # ------------------------------------------------------------------ training
    def step(self) -> dict:
        """One optimisation step. Returns its metrics (also appended to `history` and metrics.jsonl).

        Holds the model's lock (`unitok.training.machine.model_lock`) for the whole step: a view that evaluates the
        same model from another thread (`eval_mode`) waits for the step instead of switching the model to eval mode
        half-way through it."""
        with model_lock(self.model):
            return self._locked_step()

    def _locked_step(self) -> dict:
        if self.device.type == "cpu" and (self.matmul_gflops is None or self.step_count % PEAK_EVERY == 0):
            self.matmul_gflops = matmul_peak(1024, 3)
        start = time.perf_counter()
        batch = self.batch_for_step(self.step_count)
        lr = lr_at(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.train_model.train()
        terms = self.loss_terms(batch)
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one host sync per step
        logged = dict(zip(terms.keys(), values))
        # the terms first, the total last: the message names the term that went wrong
        bad = sorted((name for name, v in logged.items() if not math.isfinite(v)), key=lambda name: name == "loss")
        self.optimizer.zero_grad(set_to_none=True)
        if bad:
            raise NonFiniteLossError(self.non_finite_message(bad[0], logged[bad[0]], bad))
        terms["loss"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=True)
        self.optimizer.step()
        extra = self.after_update(batch)
        self.step_count += 1
        seconds = time.perf_counter() - start
        compiling = self.compiling_steps > 0
        self.compiling_steps -= compiling
        self.clock.count("compile" if compiling else "train", seconds, self.matmul_gflops)
        metrics = {"step": self.step_count, "lr": lr, **logged, "grad_norm": float(grad_norm), "seconds": seconds,
                   "matmul_gflops": self.matmul_gflops, **self.step_metrics(batch, logged, seconds), **extra,
                   **({"compiling": compiling} if getattr(self.config, "compile", False) else {})}
        self.history.append(metrics)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for fn in self.callbacks["step"]:
            fn(self, metrics)
        return metrics

    def non_finite_message(self, name: str, value: float, bad: List[str]) -> str:
        last = self.last_checkpoint_step()
        kept = ("the model keeps its weights from before this step" if self.out_dir is None else
                f"no checkpoint has been written to {self.out_dir} yet" if last is None else
                f"the last good checkpoint (step {last}) is kept in {self.out_dir}")
        return (f"loss term {name!r} became {value} at step {self.step_count + 1} (non-finite terms: {bad}); "
                f"training stopped and {kept}.")

    def run(self, steps: Optional[int] = None, progress: bool = True) -> List[dict]:
        """Train until `steps` more steps are done (default: up to config.steps), evaluating and checkpointing on
        schedule. Returns the history. Safe to call repeatedly (e.g. from a notebook).

        Ctrl-C (a notebook's ■) finishes the step in progress with its scheduled evaluation, writes a checkpoint
        when there is a run folder, and raises `TrainingInterrupted`; a second Ctrl-C stops at once."""
        from tqdm.auto import tqdm

        target = self.config.steps if steps is None else self.step_count + steps
        bar = tqdm(total=max(0, target - self.step_count), disable=not (progress and self.is_main),
                   desc=self.progress_name)
        try:
            with _DeferredInterrupt() as interrupt:
                if self.compiling_steps:
                    bar.set_description(f"{self.progress_name} (compiling)")
                while self.step_count < target:
                    compiling = self.compiling_steps > 0
                    metrics = self.step()
                    if compiling and not self.compiling_steps:   # the label changes once, not at every step
                        bar.set_description(self.progress_name)
                    bar.update(1)
                    if self.step_count % self.config.log_every == 0:
                        bar.set_postfix(**self.progress_postfix(metrics))
                    if self.eval_due():
                        self.evaluate(**self.scheduled_evaluation_options())
                    if self.checkpoint_due() or interrupt.requested:
                        self.save_checkpoint()
                    if interrupt.requested:
                        raise TrainingInterrupted(self.interrupt_message())
        finally:
            bar.close()
        return self.history

    def interrupt_message(self) -> str:
        """Where training stopped and what is on disk (the CLI adds how to resume)."""
        saved = self.last_checkpoint_step()
        where = ("the model keeps its weights" if self.out_dir is None else
                 "no checkpoint was written yet" if saved is None else
                 f"the last checkpoint is step {saved} in {self.out_dir / 'checkpoint.pt'}")
        return f"stopped at step {self.step_count}; {where}"

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, **kwargs) -> dict:
        """An evaluation pass (`evaluation(**kwargs)`), logged to eval_history and eval.jsonl; saves out/best/ when
        `best_metric` improves."""
        start = time.perf_counter()
        results = {"step": self.step_count, **self.evaluation(**kwargs)}
        self.clock.count("eval", time.perf_counter() - start, self.matmul_gflops)
        self.eval_history.append(results)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(results) + "\n")
            score = self.selection_score(results)
            if score is not None and (score > self.best_score if self.best_mode == "max" else score < self.best_score):
                self.best_score = score
                self.save_model(self.out_dir / "best")
        for fn in self.callbacks["eval"]:
            fn(self, results)
        return results

    def scheduled_evaluation_options(self) -> dict:
        """Keyword arguments for the evaluations `run` makes every eval_every steps (not for a direct `evaluate()`)."""
        return {}

    def selection_score(self, results: dict) -> Optional[float]:
        """The number that picks out/best/ (compared by best_mode); None when this evaluation has none."""
        return results.get(self.best_metric) if self.best_metric else None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "clock": self.clock.state_dict(),
                "best_score": self.best_score, "history": self.history, "eval_history": self.eval_history,
                "torch_rng": torch.get_rng_state(), **self.extra_state()}

    def save_checkpoint(self) -> Optional[Path]:
        """Write out_dir/checkpoint.pt atomically (temp file + rename): a crash mid-save keeps the previous one.
        Rank 0 only."""
        if not self.is_main or self.out_dir is None:
            return None
        path = self.out_dir / "checkpoint.pt"
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def last_checkpoint_step(self) -> Optional[int]:
        """The step saved in out_dir/checkpoint.pt, or None when there is none."""
        return saved_step(self.out_dir) if self.out_dir is not None else None

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly where it left off. Log lines
        written after the checkpoint (a crash) are dropped from metrics.jsonl and eval.jsonl."""
        state = read_torch(path, what=f"a checkpoint.pt written by {type(self).__name__}.save_checkpoint")
        load_state_dict_checked(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.clock = int(state["step"]), RunClock.from_state(state)
        self.best_score = float(state["best_score"])
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
        self.load_extra_state(state)
        if self.is_main and self.out_dir is not None:
            for name, rows in (("metrics.jsonl", self.history), ("eval.jsonl", self.eval_history)):
                write_log_if_changed(self.out_dir / name, rows)

    # ------------------------------------------------------------------ the end
    def write_summary(self, extra: Optional[dict] = None) -> dict:
        """summary.json (steps, time, precision, the last evaluation, `extra`) and the final weights in
        out_dir/final/ (out_dir/best/ holds the best evaluation's)."""
        summary = {"steps": self.step_count, **self.clock.summary(), "precision": "bf16" if self.bf16 else "fp32",
                   **self.summary_fields()}
        summary.update(self.eval_history[-1] if self.eval_history else {})
        summary.update(extra or {})
        if self.is_main and self.out_dir is not None:
            self.save_model(self.out_dir / "final")
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

