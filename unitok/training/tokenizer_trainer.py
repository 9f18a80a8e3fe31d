"""A step-through trainer: one call, one optimisation step, one dict of metrics.

    >>> trainer = Trainer.from_preset("tiny", data="shapes", out_dir="runs/tiny")
    >>> trainer.step()                       # {'step': 1, 'loss': ..., 'l1': ..., 'psnr_batch': ..., 'lr': ...}
    >>> trainer.run(500)                     # tqdm progress bar; evaluates and checkpoints on schedule
    >>> pd.DataFrame(trainer.history)        # one row per step
    >>> trainer.evaluate()                   # PSNR, SSIM, codebook statistics, zero-shot, retrieval, (FID)

Same code on CPU (fp32, bit-for-bit repeatable for a seed), on a GPU (bf16 autocast + TF32) and under
`torchrun --nproc_per_node=N` (DDP: gloo on CPU, nccl on GPU; data sharded by rank; code counts all-reduced;
only rank 0 writes).

Resumption is exact: the data order is a pure function of (seed, step), so a checkpoint needs only the weights,
the optimizer state, the step, the codebook tracker and the history. Checkpoints are written atomically.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
import weakref
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from ..tokenizer.config import ModelConfig, Preset, TrainConfig, apply_overrides, get_preset, to_dict
from .checkpoint import atomic_write, load_state_dict_checked, read_torch
from ..evaluation.codebook_stats import CodebookTracker, stats_from_counts
from ..data.datasets import build_datasets
from ..evaluation.tokenizer import evaluate_model, make_summary, write_run_outputs
from .discriminator import AdversarialLoss, build_lpips, check_loss_weights
from .losses import UniTokLoss
from ..tokenizer.model import UniTok
from .runs import RunLock, atomic_write_text, prepare_run_folder
from .machine import model_lock, pick_device, training_autocast, uses_bf16

LOSS_TERMS = ("l1", "l2", "vq", "clip")


class NonFiniteLossError(RuntimeError):
    """Raised when a loss term becomes NaN/Inf; the weights are left as they were before that step."""


# ---------------------------------------------------------------------------------------------------------------
# data order: a pure function of (seed, step) so that a resumed run sees exactly the batches it would have seen
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
        out = []
        for p in range(first, first + self.batch):
            out.append(int(self._permutation(p // self.n)[p % self.n]))
        return out

    def __iter__(self):
        step = self.start_step
        while True:
            yield self.indices_for_step(step)
            step += 1

    def __len__(self):  # infinite; DataLoader only needs it for len(loader), which we never call
        return 2 ** 62


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_fraction of the steps, then cosine from lr down to min_lr_ratio * lr."""
    warmup = max(1, int(cfg.warmup_fraction * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, cfg.steps - warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def _distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def default_data_name(dataset: Dataset) -> str:
    return getattr(dataset, "name", type(dataset).__name__)


class Trainer:
    """Trains a UniTok model one step at a time. See the module docstring.

    Args:
        model_config, train_config: the two printable configs (see `unitok.tokenizer.config`).
        train_data: a dataset of {"image", "caption", "labels"} items (see `unitok.data.datasets`).
        eval_data: datasets for `evaluate()`: {"recon": ds, "zero_shot": ds, "zero_shot_heldout": ds}; any may be
            missing. Built from `data` automatically by `from_preset`.
        out_dir: a run folder for config, metrics.jsonl, checkpoints and summary.json (None: keep nothing on disk).
        resume: continue from out_dir's latest checkpoint if there is one.
        overwrite: start a new run in an out_dir that holds one (the old run is moved aside, never deleted).
            Without `resume` or `overwrite`, an out_dir that holds a run is refused (see `unitok.training.runs`).
        data_spec: how the datasets were built (saved in the run's config so `unitok eval` can rebuild them).
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, train_data: Dataset,
                 eval_data: Optional[Dict[str, Dataset]] = None, out_dir: Optional[Union[str, Path]] = None,
                 resume: bool = False, data_spec: Optional[dict] = None, model: Optional[UniTok] = None,
                 overwrite: bool = False):
        self.model_config, self.config = model_config, train_config
        self.rank, self.world_size, local_rank = _distributed()
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and train_config.device in ("auto", "cuda") else "gloo"
            dist.init_process_group(backend)
        self.device = pick_device(train_config.device, local_rank)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        check_loss_weights(model_config, train_config)  # a missing LPIPS / DINOv2 file stops us before any work
        seed_everything(train_config.seed)
        self.model = (model or UniTok(model_config)).to(self.device)
        self.train_data, self.eval_data = train_data, eval_data or {}
        self.data_spec = data_spec or {"name": default_data_name(train_data)}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._lock = None
        if self.out_dir is not None and self.is_main:  # one run per folder, one process per run (unitok.training.runs)
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite)
            self._lock = RunLock(self.out_dir, "unitok train").acquire()
            weakref.finalize(self, self._lock.release)
        self.loss_fn = UniTokLoss(model_config, self.rank, self.world_size, perceptual=build_lpips(
            train_config.lpips_weights).to(self.device) if model_config.lpips_weight else None)
        # the GAN term and the discriminator, a second optimizer stepped in the same step (unitok.training.discriminator)
        self.adversarial = (AdversarialLoss(model_config, train_config, self.device, autocast=self._autocast)
                            if model_config.gan_weight else None)
        self.optimizer = self._build_optimizer()
        self.tracker = CodebookTracker(model_config.num_codebooks, model_config.codebook_size,
                                         window_tokens=max(4096, 16 * model_config.codebook_size), device=self.device)
        self.step_count = 0
        self.train_seconds = 0.0
        self.history: List[dict] = []
        self.eval_history: List[dict] = []
        self.best_score = -math.inf
        self.callbacks: Dict[str, List[Callable]] = {"step": [], "eval": []}
        self._train_model = self.model
        if self.world_size > 1:
            self._train_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False, find_unused_parameters=not model_config.clip_weight)
        if train_config.compile:
            self._train_model = torch.compile(self._train_model)
        if resume and self.out_dir is not None and (self.out_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.out_dir / "checkpoint.pt")
        self._loader_iter = None
        if self.is_main and self.out_dir is not None:
            config_text = json.dumps({"model": to_dict(model_config), "train": to_dict(train_config),
                                      "data": self.data_spec}, indent=2)
            config_path = self.out_dir / "config.json"
            if not config_path.exists() or config_path.read_text() != config_text:
                atomic_write_text(config_path, config_text)

    def close(self) -> None:
        """Release the run folder's lock (also done when the trainer is garbage-collected or the process ends)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_preset(cls, preset: Union[str, Preset] = "tiny", data: str = "shapes", out_dir=None,
                    overrides: Union[List[str], dict, None] = None, resume: bool = False,
                    data_path: Optional[str] = None, eval_images: Optional[int] = None) -> "Trainer":
        """Build a trainer from a named preset, a dataset name and optional `key=value` overrides."""
        preset = get_preset(preset) if isinstance(preset, str) else preset
        if overrides:
            preset = apply_overrides(preset, overrides)
        spec = {"name": data, "path": data_path, "eval_images": eval_images or preset.train.eval_images}
        train_data, eval_data = build_datasets(spec, preset.model.image_size, preset.train.seed)
        return cls(preset.model, preset.train, train_data, eval_data, out_dir=out_dir, resume=resume,
                   data_spec=spec)

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on every matrix, codebooks included (as in the reference); none on biases, norms, positions
        # and logit_scale.
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (decay if p.ndim >= 2 and "pos_embed" not in name else no_decay).append(p)
        cfg = self.config
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                                 # fused on CPU too: one kernel instead of ~12 ops per tensor, ~7x faster there
                                 fused=self.device.type in ("cuda", "cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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

    # ------------------------------------------------------------------ data
    def _next_batch(self) -> dict:
        if self._loader_iter is None:
            if isinstance(self.train_data, IterableDataset):
                loader = DataLoader(self.train_data, batch_size=self.config.batch_size,
                                    num_workers=self.config.num_workers, drop_last=True)
                self._loader_iter = _repeat(loader)
            else:
                sampler = StepBatchSampler(len(self.train_data), self.config.batch_size, self.config.seed,
                                           self.rank, self.world_size, start_step=self.step_count)
                loader = DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.config.num_workers,
                                    pin_memory=self.device.type == "cuda", collate_fn=default_collate,
                                    persistent_workers=self.config.num_workers > 0)
                self._loader_iter = iter(loader)
        return next(self._loader_iter)

    def _autocast(self):
        return training_autocast(self.device, self.config.amp, self.config.cpu_bf16)

    # ------------------------------------------------------------------ training
    def step(self) -> dict:
        """One optimisation step. Returns its metrics (also appended to `history`).

        Holds the model's lock (`unitok.training.machine.model_lock`) for the whole step: a view that evaluates the same
        model from another thread (`eval_mode`) waits for the step instead of switching the model to eval mode
        half-way through it."""
        with model_lock(self.model):
            return self._locked_step()

    def _locked_step(self) -> dict:
        start = time.perf_counter()
        batch = self._next_batch()
        images = batch["image"].to(self.device, non_blocking=True)
        texts = list(batch["caption"]) if self.model_config.clip_weight else None
        if texts is not None and self.model_config.hard_negative_weight and "negative_caption" in batch:
            texts += list(batch["negative_caption"])  # the loss reads rows B.. as one hard negative per image
        lr = lr_at(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_model.train()
        with self._autocast():
            out = self._train_model(images, texts)
        terms = self.loss_fn(out, images)
        if self.adversarial is not None:  # GAN term with the adaptive weight on the decoder's last layer
            terms = self.adversarial.generator_terms(terms, out.reconstruction, self.model.last_decoder_layer,
                                                     self.step_count, self.config.steps)
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one host sync per step
        logged = dict(zip(terms.keys(), values))
        bad = [name for name, v in logged.items() if not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            last = self.last_checkpoint_step()
            kept = ("the model keeps its weights from before this step" if self.out_dir is None else
                    f"no checkpoint has been written to {self.out_dir} yet" if last is None else
                    f"the last good checkpoint (step {last}) is kept in {self.out_dir}")
            raise NonFiniteLossError(f"loss term {bad[0]!r} became {logged[bad[0]]} at step {self.step_count + 1} "
                                     f"(non-finite terms: {bad}); training stopped and {kept}.")
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip, foreach=True)
        self.optimizer.step()
        disc_metrics = ({} if self.adversarial is None else self.adversarial.discriminator_step(
            images, out.reconstruction.detach(), self.step_count, self.config.steps))
        with torch.no_grad():  # the reference clamps the learnable temperature to at most ln(100)
            self.model.logit_scale.clamp_(0, self.model_config.logit_scale_max)
        self.tracker.update(out.codes.detach())
        self.step_count += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        metrics = {"step": self.step_count, "lr": lr, "loss": logged.pop("total"), **logged,
                   "psnr_batch": 10 * math.log10(4.0 / max(logged["l2"], 1e-12)),
                   "grad_norm": float(grad_norm), "logit_scale": float(self.model.logit_scale.detach().exp()),
                   "seconds": seconds, "images_per_second": images.shape[0] * self.world_size / seconds,
                   **disc_metrics}
        if self.step_count % self.config.log_every == 0 or self.step_count == 1:
            metrics.update(self.codebook_window_stats())
        self.history.append(metrics)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for fn in self.callbacks["step"]:
            fn(self, metrics)
        return metrics

    def codebook_window_stats(self) -> dict:
        """Usage / dead / perplexity per sub-codebook over the recent-token window (every rank's window under DDP).

        This is the only place the tracker syncs with the host, and it runs every `log_every` steps.
        """
        counts = self.tracker.window_counts()
        if self.world_size > 1:
            dist.all_reduce(counts)
        s = stats_from_counts(counts)
        return {"codebook_usage": s["codebook_usage"], "dead_codes": s["dead_codes"], "perplexity": s["perplexity"],
                "codebook_window_tokens": s["window_tokens"]}

    def run(self, steps: Optional[int] = None, progress: bool = True) -> List[dict]:
        """Train until `steps` more steps are done (default: up to config.steps), evaluating and checkpointing on
        schedule. Returns the history. Safe to call repeatedly (e.g. from a notebook)."""
        from tqdm.auto import tqdm

        target = self.config.steps if steps is None else self.step_count + steps
        bar = tqdm(total=target - self.step_count, disable=not (progress and self.is_main), desc="train")
        try:
            while self.step_count < target:
                m = self.step()
                bar.update(1)
                if self.step_count % self.config.log_every == 0:
                    bar.set_postfix(loss=f"{m['loss']:.3f}", psnr=f"{m['psnr_batch']:.1f}")
                if self.eval_due():
                    self.evaluate()
                if self.checkpoint_due():
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, fid: Optional[str] = None, max_images: Optional[int] = None) -> dict:
        """Full evaluation pass; see `evaluate_model`. Saves the best model (by PSNR) when there is a run folder."""
        results = evaluate_model(self.model, self.eval_data, batch_size=self.config.batch_size,
                                 device=self.device, fid=fid, max_images=max_images)
        results["step"] = self.step_count
        self.eval_history.append(results)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(results) + "\n")
            if results.get("psnr", -math.inf) > self.best_score:
                self.best_score = results["psnr"]
                self.model.save_pretrained(self.out_dir / "best")
        for fn in self.callbacks["eval"]:
            fn(self, results)
        return results

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "tracker": self.tracker.state_dict(),
            "step": self.step_count,
            "train_seconds": self.train_seconds,
            "best_score": self.best_score,
            "history": self.history,
            "eval_history": self.eval_history,
            "torch_rng": torch.get_rng_state(),
            **({"adversarial": self.adversarial.state_dict()} if self.adversarial is not None else {}),
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Write out_dir/checkpoint.pt atomically (temp file + rename): a crash mid-save keeps the previous one."""
        if not self.is_main or self.out_dir is None:
            return None
        path = self.out_dir / "checkpoint.pt"
        state = self.state_dict()
        atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def last_checkpoint_step(self) -> Optional[int]:
        """The step saved in out_dir/checkpoint.pt, or None when there is none."""
        if self.out_dir is None or not (self.out_dir / "checkpoint.pt").exists():
            return None
        return int(read_torch(self.out_dir / "checkpoint.pt")["step"])

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly where it left off."""
        state = read_torch(path, what="a checkpoint.pt written by Trainer.save_checkpoint")
        load_state_dict_checked(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.tracker.to(self.device)
        self.step_count, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.best_score = float(state["best_score"])
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
        if self.adversarial is not None:
            self.adversarial.load_state_dict(state.get("adversarial"))
        self._loader_iter = None
        if self.is_main and self.out_dir is not None:  # drop log lines written after the checkpoint (a crash)
            for name, rows in (("metrics.jsonl", self.history), ("eval.jsonl", self.eval_history)):
                with open(self.out_dir / name, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_summary(self, results: Optional[dict] = None) -> dict:
        """summary.json + reconstruction grid PNG + codebook-usage PNG in the run folder."""
        results = results if results is not None else (self.eval_history[-1] if self.eval_history else self.evaluate())
        summary = make_summary(results, steps=self.step_count, train_seconds=self.train_seconds,
                               model_config=self.model_config, data=self.data_spec)
        summary["precision"] = "bf16" if uses_bf16(self.device, self.config.amp, self.config.cpu_bf16) else "fp32"
        if self.is_main and self.out_dir is not None:
            write_run_outputs(self.out_dir, summary, self.model, self.eval_data, self.device)
        return summary


def _repeat(loader):
    while True:
        yield from loader
