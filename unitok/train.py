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
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from . import metrics as M
from .config import ModelConfig, Preset, TrainConfig, apply_overrides, get_preset, to_dict
from .data import build_dataset
from .losses import UniTokLoss
from .model import UniTok, _atomic_write, load_state_dict_checked

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


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def default_data_name(dataset: Dataset) -> str:
    return getattr(dataset, "name", type(dataset).__name__)


class Trainer:
    """Trains a UniTok model one step at a time. See the module docstring.

    Args:
        model_config, train_config: the two printable configs (see `unitok.config`).
        train_data: a dataset of {"image", "caption", "labels"} items (see `unitok.data`).
        eval_data: datasets for `evaluate()`: {"recon": ds, "zero_shot": ds, "zero_shot_heldout": ds}; any may be
            missing. Built from `data` automatically by `from_preset`.
        out_dir: a run folder for config, metrics.jsonl, checkpoints and summary.json (None: keep nothing on disk).
        resume: continue from out_dir's latest checkpoint if there is one.
        data_spec: how the datasets were built (saved in the run's config so `unitok eval` can rebuild them).
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, train_data: Dataset,
                 eval_data: Optional[Dict[str, Dataset]] = None, out_dir: Optional[Union[str, Path]] = None,
                 resume: bool = False, data_spec: Optional[dict] = None, model: Optional[UniTok] = None):
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
        seed_everything(train_config.seed)
        self.model = (model or UniTok(model_config)).to(self.device)
        self.train_data, self.eval_data = train_data, eval_data or {}
        self.data_spec = data_spec or {"name": default_data_name(train_data)}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.loss_fn = UniTokLoss(model_config, self.rank, self.world_size)
        self.optimizer = self._build_optimizer()
        self.tracker = M.CodebookTracker(model_config.num_codebooks, model_config.codebook_size,
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
            self.out_dir.mkdir(parents=True, exist_ok=True)
            _atomic_write(self.out_dir / "config.json", lambda p: Path(p).write_text(json.dumps(
                {"model": to_dict(model_config), "train": to_dict(train_config), "data": self.data_spec}, indent=2)))

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
                                 fused=self.device.type == "cuda")

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
        enabled = self.config.amp and self.device.type == "cuda"
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=enabled)

    # ------------------------------------------------------------------ training
    def step(self) -> dict:
        """One optimisation step. Returns its metrics (also appended to `history`)."""
        start = time.perf_counter()
        batch = self._next_batch()
        images = batch["image"].to(self.device, non_blocking=True)
        texts = list(batch["caption"]) if self.model_config.clip_weight else None
        lr = lr_at(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_model.train()
        with self._autocast():
            out = self._train_model(images, texts)
        terms = self.loss_fn(out, images)
        values = torch.stack([t.detach().float() for t in terms.values()]).tolist()  # one host sync per step
        logged = dict(zip(terms.keys(), values))
        bad = [name for name, v in logged.items() if not math.isfinite(v)]
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            last = self._last_checkpoint_step()
            kept = ("the model keeps its weights from before this step" if self.out_dir is None else
                    f"no checkpoint has been written to {self.out_dir} yet" if last is None else
                    f"the last good checkpoint (step {last}) is kept in {self.out_dir}")
            raise NonFiniteLossError(f"loss term {bad[0]!r} became {logged[bad[0]]} at step {self.step_count + 1} "
                                     f"(non-finite terms: {bad}); training stopped and {kept}.")
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        with torch.no_grad():  # the reference clamps the learnable temperature to at most ln(100)
            self.model.logit_scale.clamp_(0, self.model_config.logit_scale_max)
        self.tracker.update(out.codes.detach())
        self.step_count += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        metrics = {"step": self.step_count, "lr": lr, "loss": logged.pop("total"), **logged,
                   "psnr_batch": 10 * math.log10(4.0 / max(logged["l2"], 1e-12)),
                   "grad_norm": float(grad_norm), "logit_scale": float(self.model.logit_scale.detach().exp()),
                   "seconds": seconds, "images_per_second": images.shape[0] * self.world_size / seconds}
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
        s = M.stats_from_counts(counts)
        return {"usage": s["usage"], "dead": s["dead"], "perplexity": s["perplexity"],
                "usage_window_tokens": s["window_tokens"]}

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
        }

    def save_checkpoint(self) -> Optional[Path]:
        """Write out_dir/checkpoint.pt atomically (temp file + rename): a crash mid-save keeps the previous one."""
        if not self.is_main or self.out_dir is None:
            return None
        path = self.out_dir / "checkpoint.pt"
        state = self.state_dict()
        _atomic_write(path, lambda tmp: torch.save(state, tmp))
        return path

    def _last_checkpoint_step(self) -> Optional[int]:
        if self.out_dir is None or not (self.out_dir / "checkpoint.pt").exists():
            return None
        return int(torch.load(self.out_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["step"])

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly where it left off."""
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_state_dict_checked(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.tracker.load_state_dict(state["tracker"])
        self.tracker.to(self.device)
        self.step_count, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.best_score = float(state["best_score"])
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
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
        if self.is_main and self.out_dir is not None:
            write_run_outputs(self.out_dir, summary, self.model, self.eval_data, self.device)
        return summary


def _repeat(loader):
    while True:
        yield from loader


# ---------------------------------------------------------------------------------------------------------------
# datasets for a run
# ---------------------------------------------------------------------------------------------------------------
def build_datasets(spec: dict, image_size: int, seed: int = 0):
    """(train dataset, eval datasets) for a data spec {"name", "path", "eval_images"}."""
    name, path, n_eval = spec["name"], spec.get("path"), int(spec.get("eval_images") or 1024)
    kwargs = {"path": path} if path else {}
    if name == "shapes":
        train = build_dataset("shapes", image_size, split="train", seed=seed)
        evals = {"recon": build_dataset("shapes", image_size, split="test", seed=seed, length=n_eval),
                 "zero_shot": build_dataset("shapes", image_size, split="test", seed=seed, length=n_eval,
                                            max_objects=1),
                 "zero_shot_heldout": build_dataset("shapes", image_size, split="heldout", seed=seed,
                                                    length=n_eval)}
    elif name == "fashion-mnist":
        train = build_dataset(name, image_size, split="train")
        test = build_dataset(name, image_size, split="test")
        evals = {"recon": test, "zero_shot": test}
    else:
        train = build_dataset(name, image_size, split="train", **kwargs)
        evals = {"recon": train} if not isinstance(train, IterableDataset) else {}
    if not isinstance(train, IterableDataset) and len(train) == 0:
        raise ValueError(f"dataset {name!r} yields no items; expected at least one image")
    return train, evals


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def _take(dataset: Dataset, n: int) -> Dataset:
    if isinstance(dataset, IterableDataset) or len(dataset) <= n:
        return dataset
    return torch.utils.data.Subset(dataset, range(n))


@torch.no_grad()
def evaluate_model(model: UniTok, eval_data: Dict[str, Dataset], batch_size: int = 64, device=None,
                   fid: Optional[str] = None, max_images: Optional[int] = None) -> dict:
    """PSNR, SSIM and codebook statistics over a full pass of eval_data["recon"]; zero-shot top-1/top-5 over the
    dataset's class names x prompt templates on eval_data["zero_shot"] (and "zero_shot_heldout"); image<->text
    retrieval R@1/R@5; FID when `fid` is "proxy" (EfficientNet-Lite0 features) or a path to Inception weights.

    Under DDP every rank evaluates the full sets (simple and exact; evaluation is small next to training).
    """
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: dict = {}
    recon = eval_data.get("recon")
    if recon is not None:
        results.update(_reconstruction_metrics(model, _take(recon, max_images or 10 ** 9), batch_size, device, fid))
    for key, suffix in (("zero_shot", ""), ("zero_shot_heldout", "_heldout")):
        ds = eval_data.get(key)
        if ds is not None and hasattr(_unwrap(ds), "zero_shot_tasks"):
            results.update(_zero_shot_metrics(model, _take(ds, max_images or 10 ** 9), batch_size, device, suffix))
    model.train(was_training)
    return results


def _unwrap(ds):
    return ds.dataset if isinstance(ds, torch.utils.data.Subset) else ds


def _loader(ds, batch_size):
    return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=default_collate)


def _reconstruction_metrics(model, ds, batch_size, device, fid) -> dict:
    k, K = model.config.num_codebooks, model.config.codebook_size
    psnrs, ssims, codes_all, img_feats, txt_feats, captions = [], [], [], [], [], []
    # every rank evaluates the whole set, so the statistics must not be summed over ranks
    fid_acc = (M.FIDAccumulator(_fid_extractor(fid), device=device, reduce_over_ranks=False)
               if fid and fid != "none" else None)
    for batch in _loader(ds, batch_size):
        images = batch["image"].to(device)
        q = model.quantize(images)
        tokens = model.post_quant_proj(model.quantizer.lookup(q.codes))
        recon = model.decoder(tokens).float().clamp(-1, 1)
        psnrs.append(M.psnr(recon, images, reduction="none").cpu())
        ssims.append(M.ssim(recon, images, reduction="none").cpu())
        codes_all.append(q.codes.reshape(-1, k).cpu())
        img_feats.append(model.image_head(tokens).float().cpu())
        txt_feats.append(model.encode_text(list(batch["caption"])).float().cpu())
        captions.extend(batch["caption"])
        if fid_acc is not None:
            fid_acc.update(real=images, fake=recon)
    stats = M.codebook_stats(torch.cat(codes_all), K)
    out = {"psnr": float(torch.cat(psnrs).mean()), "ssim": float(torch.cat(ssims).mean()),
           "eval_images": int(sum(len(p) for p in psnrs)),
           "codebook_usage": stats["usage"], "dead_codes": stats["dead"], "perplexity": stats["perplexity"],
           "normalized_entropy": stats["normalized_entropy"], "batch_usage": stats["batch_usage"],
           "joint_unique_fraction": stats["joint_unique_fraction"], "mean_pairwise_mi": stats["mean_pairwise_mi"],
           "codebook_window_tokens": stats["window_tokens"]}
    out.update({f"retrieval_{k_}": v for k_, v in
                M.retrieval_recall(torch.cat(img_feats), torch.cat(txt_feats), captions=captions).items()})
    if fid_acc is not None:
        f = fid_acc.compute()
        out.update({"fid": f["fid"], "fid_extractor": f["extractor"], "fid_images": f["num_images"]})
    return out


def _fid_extractor(fid: str):
    if fid == "proxy":
        return M.EfficientNetLite0Features()
    if os.path.isfile(fid):
        return M.InceptionFeatures(fid)
    raise ValueError(f"fid must be 'none', 'proxy' or a path to Inception-v3 weights, got {fid!r}")


def _zero_shot_metrics(model, ds, batch_size, device, suffix) -> dict:
    tasks = _unwrap(ds).zero_shot_tasks()
    feats, labels = [], {name: [] for name in tasks}
    for batch in _loader(ds, batch_size):
        feats.append(model.encode_image(batch["image"].to(device)).float())
        for name, (_, _, key) in tasks.items():
            labels[name].append(batch["labels"][key])
    feats = torch.cat(feats)
    out = {}
    for i, (name, (classnames, templates, _)) in enumerate(tasks.items()):
        classifier = M.zero_shot_classifier(model, classnames, templates, device=device)
        acc = M.zero_shot_accuracy(feats, torch.cat(labels[name]).to(device), classifier)
        for k_, v in acc.items():
            if k_.startswith("top"):
                out[f"zero_shot_{name}_{k_}{suffix}"] = v
    # The headline figure: the most specific task (the first one a dataset lists).
    headline = next(iter(tasks))
    out[f"zero_shot_top1{suffix}"] = out[f"zero_shot_{headline}_top1{suffix}"]
    out[f"zero_shot_task{suffix}"] = headline
    return out


# ---------------------------------------------------------------------------------------------------------------
# run outputs
# ---------------------------------------------------------------------------------------------------------------
def make_summary(results: dict, steps: int, train_seconds: float, model_config: ModelConfig, data: dict) -> dict:
    summary = {"steps": steps, "train_seconds": round(train_seconds, 2), "data": data,
               "model": {"image_size": model_config.image_size, "tokens": model_config.num_tokens,
                         "num_codebooks": model_config.num_codebooks, "codebook_size": model_config.codebook_size}}
    summary.update(results)
    return summary


def write_run_outputs(out_dir: Path, summary: dict, model: UniTok, eval_data: dict, device) -> None:
    """summary.json, reconstructions.png (originals over reconstructions) and codebook_usage.png."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from .data import make_grid_image

    out_dir = Path(out_dir)
    _atomic_write(out_dir / "summary.json", lambda p: Path(p).write_text(json.dumps(summary, indent=2)))
    recon_ds = eval_data.get("recon")
    if recon_ds is not None:
        batch = default_collate([recon_ds[i] for i in range(min(16, len(recon_ds)))])
        images = batch["image"].to(device)
        with torch.no_grad():
            model.eval()
            recon = model.reconstruct(images).clamp(-1, 1)
        grid = make_grid_image(torch.cat([images, recon]).cpu(), nrow=len(images))
        plt.imsave(out_dir / "reconstructions.png", grid)
    usage = summary.get("codebook_usage")
    if usage:
        fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(usage) + 2), 3))
        ax.bar(range(len(usage)), [100 * u for u in usage], color="#4c72b0")
        ax.set_xlabel("sub-codebook")
        ax.set_ylabel("codes used (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"codebook usage over {summary.get('codebook_window_tokens', '?')} eval tokens")
        fig.tight_layout()
        fig.savefig(out_dir / "codebook_usage.png", dpi=100)
        plt.close(fig)
