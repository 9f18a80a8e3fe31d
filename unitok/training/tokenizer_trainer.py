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

import math
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torch.utils.data._utils.collate import default_collate

from ..data.datasets import build_datasets
from ..evaluation.codebook_stats import CodebookTracker, stats_from_counts
from ..evaluation.tokenizer import evaluate_model, make_summary, write_run_outputs
from ..tokenizer.config import ModelConfig, Preset, TrainConfig, apply_overrides, get_preset, to_dict
from ..tokenizer.model import UniTok
from .discriminator import AdversarialLoss, build_lpips, check_loss_weights
from .losses import UniTokLoss
from .trainer import StepBatchSampler, TrainerBase

LOSS_TERMS = ("l1", "l2", "vq", "clip")


def default_data_name(dataset: Dataset) -> str:
    return getattr(dataset, "name", type(dataset).__name__)


class Trainer(TrainerBase):
    """Trains a UniTok model one step at a time. See the module docstring; the run-folder rules, checkpoints,
    schedule and `run` come from `unitok.training.trainer.TrainerBase`.

    Args:
        model_config, train_config: the two printable configs (see `unitok.tokenizer.config`).
        train_data: a dataset of {"image", "caption", "labels"} items (see `unitok.data`).
        eval_data: datasets for `evaluate()`: {"recon": ds, "zero_shot": ds, "zero_shot_heldout": ds}; any may be
            missing. Built from `data` automatically by `from_preset`.
        out_dir: a run folder for config, metrics.jsonl, checkpoints and summary.json (None: keep nothing on disk).
        resume: continue from out_dir's latest checkpoint if there is one.
        overwrite: start a new run in an out_dir that holds one (the old run is moved aside, never deleted).
            Without `resume` or `overwrite`, an out_dir that holds a run is refused (see `unitok.training.runs`).
        data_spec: how the datasets were built (saved in the run's config so `unitok eval` can rebuild them).
    """

    command = "unitok train"
    progress_name = "train"
    best_metric, best_mode = "psnr", "max"

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig, train_data: Dataset,
                 eval_data: Optional[Dict[str, Dataset]] = None, out_dir: Optional[Union[str, Path]] = None,
                 resume: bool = False, data_spec: Optional[dict] = None, model: Optional[UniTok] = None,
                 overwrite: bool = False):
        super().__init__(train_config)
        self.model_config = model_config
        self.find_unused_parameters = not model_config.clip_weight
        check_loss_weights(model_config, train_config)  # a missing LPIPS / DINOv2 file stops us before any work
        model = (model or UniTok(model_config)).to(self.device)
        self.train_data, self.eval_data = train_data, eval_data or {}
        self.data_spec = data_spec or {"name": default_data_name(train_data)}
        self.loss_fn = UniTokLoss(model_config, self.rank, self.world_size, perceptual=build_lpips(
            train_config.lpips_weights).to(self.device) if model_config.lpips_weight else None)
        # the GAN term and the discriminator, a second optimizer stepped in the same step (training.discriminator)
        self.adversarial = (AdversarialLoss(model_config, train_config, self.device, autocast=self.autocast)
                            if model_config.gan_weight else None)
        self.tracker = CodebookTracker(model_config.num_codebooks, model_config.codebook_size,
                                       window_tokens=max(4096, 16 * model_config.codebook_size), device=self.device)
        self._loader_iter = None
        self._out = None                 # the last step's model output, for after_update
        self.start_run(model, out_dir=out_dir, resume=resume, overwrite=overwrite)

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

    def run_config(self) -> dict:
        return {"model": to_dict(self.model_config), "train": to_dict(self.config), "data": self.data_spec}

    def save_model(self, directory) -> Path:
        return self.model.save_pretrained(directory)

    def build_optimizer(self) -> torch.optim.Optimizer:
        # Weight decay on every matrix, codebooks included (as in the reference); none on biases, norms, positions
        # and logit_scale.
        self.no_decay_suffixes = ("pos_embed",)
        return super().build_optimizer()

    # ------------------------------------------------------------------ data
    def batch_for_step(self, step: int) -> dict:
        """The loader's next batch: a StepBatchSampler started at the current step, so it is the batch of `step`
        (an IterableDataset is streamed in its own order instead)."""
        if self._loader_iter is None:
            if isinstance(self.train_data, IterableDataset):
                loader = DataLoader(self.train_data, batch_size=self.config.batch_size,
                                    num_workers=self.config.num_workers, drop_last=True)
                self._loader_iter = _repeat(loader)
            else:
                sampler = StepBatchSampler(len(self.train_data), self.config.batch_size, self.config.seed,
                                           self.rank, self.world_size, start_step=step)
                loader = DataLoader(self.train_data, batch_sampler=sampler, num_workers=self.config.num_workers,
                                    pin_memory=self.device.type == "cuda", collate_fn=default_collate,
                                    persistent_workers=self.config.num_workers > 0)
                self._loader_iter = iter(loader)
        batch = next(self._loader_iter)
        batch["image"] = batch["image"].to(self.device, non_blocking=True)
        return batch

    # ------------------------------------------------------------------ the step
    def loss_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        images = batch["image"]
        texts = list(batch["caption"]) if self.model_config.clip_weight else None
        if texts is not None and self.model_config.hard_negative_weight and "negative_caption" in batch:
            texts += list(batch["negative_caption"])  # the loss reads rows B.. as one hard negative per image
        # token ids, not strings, enter the forward pass: a compiled forward would guard on every caption's text
        # and recompile at every step
        ids = self.model.tokenize(texts).to(self.device) if texts is not None else None
        with self.autocast():
            out = self.train_model(images, ids)
        terms = self.loss_fn(out, images)
        if self.adversarial is not None:  # GAN term with the adaptive weight on the decoder's last layer
            terms = self.adversarial.generator_terms(terms, out.reconstruction, self.model.last_decoder_layer,
                                                     self.step_count, self.config.steps)
        self._out = out
        return {"loss": terms.pop("total"), **terms}

    def after_update(self, batch: dict) -> dict:
        out, self._out = self._out, None
        disc_metrics = ({} if self.adversarial is None else self.adversarial.discriminator_step(
            batch["image"], out.reconstruction.detach(), self.step_count, self.config.steps))
        with torch.no_grad():  # the reference clamps the learnable temperature to at most ln(100)
            self.model.logit_scale.clamp_(0, self.model_config.logit_scale_max)
        self.tracker.update(out.codes.detach())
        return disc_metrics

    def step_metrics(self, batch: dict, terms: Dict[str, float], seconds: float) -> dict:
        metrics = {"psnr_batch": 10 * math.log10(4.0 / max(terms["l2"], 1e-12)),
                   "logit_scale": float(self.model.logit_scale.detach().exp()),
                   "images_per_second": batch["image"].shape[0] * self.world_size / seconds}
        if self.step_count % self.config.log_every == 0 or self.step_count == 1:   # called after the step
            metrics.update(self.codebook_window_stats())
        return metrics

    def progress_postfix(self, metrics: dict) -> dict:
        return {"loss": f"{metrics['loss']:.3f}", "psnr": f"{metrics['psnr_batch']:.1f}"}

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

    # ------------------------------------------------------------------ evaluation
    evaluation_progress = False     # a tqdm bar over each evaluation's images (the CLI turns it on)

    def evaluation(self, fid: Optional[str] = None, max_images: Optional[int] = None) -> dict:
        """Full evaluation pass; see `evaluate_model`. `evaluate()` (the base) logs it and saves best/ by PSNR."""
        return evaluate_model(self.model, self.eval_data, batch_size=self.config.batch_size,
                              device=self.device, fid=fid, max_images=max_images,
                              progress=self.evaluation_progress and self.is_main)

    def scheduled_evaluation_options(self) -> dict:
        """`run`'s evaluations before the last step use the first `interim_eval_images` images of each set (when
        set): a recipe's evaluations count towards its time, and the curve needs fewer images than the final
        numbers. A direct `evaluate()` always uses `eval_images`."""
        interim = self.config.interim_eval_images
        return {"max_images": interim} if interim and self.step_count < self.config.steps else {}

    # ------------------------------------------------------------------ checkpoints
    def extra_state(self) -> dict:
        return {"tracker": self.tracker.state_dict(),
                **({"adversarial": self.adversarial.state_dict()} if self.adversarial is not None else {})}

    def load_extra_state(self, state: dict) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.tracker.to(self.device)
        if self.adversarial is not None:
            self.adversarial.load_state_dict(state.get("adversarial"))
        self._loader_iter = None

    def write_summary(self, results: Optional[dict] = None) -> dict:
        """summary.json + reconstruction grid PNG + codebook-usage PNG in the run folder."""
        results = results if results is not None else (self.eval_history[-1] if self.eval_history else self.evaluate())
        summary = make_summary(results, steps=self.step_count, times=self.clock.summary(),
                               model_config=self.model_config, data=self.data_spec)
        summary["precision"] = "bf16" if self.bf16 else "fp32"
        if self.is_main and self.out_dir is not None:
            write_run_outputs(self.out_dir, summary, self.model, self.eval_data, self.device)
        return summary


def _repeat(loader):
    while True:
        yield from loader
