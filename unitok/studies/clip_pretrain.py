"""The `init` study's CLIP pre-training: a UniTok's encoder, image head and text tower trained first as a
continuous CLIP (nothing quantized) on the same data, whose weights then initialise a tokenizer.

    >>> out = pretrain_clip(model_config, train_config, train_data, eval_data)   # {"state", "seconds", ...}
    >>> tokenizer = UniTok(model_config); tokenizer.load_state_dict(out["state"], strict=False)

`pretrained_clip` is what a study run calls: it trains the CLIP once per (config, seed, data) into its own run
folder (OUT/runs/clip-<key>) and reads it back the next time.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.nn as nn

from .spec import read_json, spec_hash

__all__ = ["CLIP_PARTS", "ContinuousCLIP", "pretrain_clip", "pretrained_clip"]


CLIP_PARTS = ("encoder", "image_blocks", "fc_norm", "projection", "text_encoder", "logit_scale")


class ContinuousCLIP(nn.Module):
    """A CLIP made of a UniTok's encoder, image head and text tower, *without* the quantizer and projections.

    encode_image: images (B, 3, S, S) -> encoder tokens (B, N, width) -> the UniTok's own image head (its image
    blocks if any, mean, fc_norm, projection, unit norm) -> (B, E); encode_text and tokenize are the UniTok's.
    This is the "CLIP" that `init` pre-trains; its weights (`CLIP_PARTS`) then initialise a tokenizer of the same
    configuration.
    """

    def __init__(self, unitok_model):
        super().__init__()
        self.unitok = unitok_model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.unitok.image_head(self.unitok.encoder(images))

    def encode_text(self, texts) -> torch.Tensor:
        return self.unitok.encode_text(texts)

    def tokenize(self, texts):
        return self.unitok.tokenize(texts)

    def clip_state_dict(self) -> dict:
        """The pre-trained parts' weights, under the UniTok's own names."""
        return {k: v.detach().cpu().clone() for k, v in self.unitok.state_dict().items()
                if k.split(".")[0] in CLIP_PARTS}


def pretrain_clip(model_config, train_config, train_data, eval_data: Optional[dict] = None,
                  device: Union[str, torch.device] = "cpu", progress: bool = False) -> dict:
    """Train a continuous CLIP (`ContinuousCLIP`) contrastively for `train_config.steps` steps on `train_data`.

    The optimiser, learning-rate schedule, batch size, data order, gradient clipping and contrastive terms (InfoNCE,
    plus the hard-negative term when the config has one) are the tokenizer's (`unitok.training.tokenizer_trainer`,
    `unitok.training.losses`), so the only difference from a contrastive-only tokenizer is that nothing is quantized.
    Returns {"state": weights of CLIP_PARTS, "seconds": training time, "zero_shot_top1"(+"_heldout"): the CLIP's own
    zero-shot accuracy on the evaluation sets when given}.
    """
    from open_clip import ClipLoss
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate
    from tqdm.auto import tqdm

    from ..training.losses import hard_negative_loss
    from ..tokenizer.model import UniTok
    from ..training.trainer import StepBatchSampler, lr_at, seed_everything

    device = torch.device(device)
    seed_everything(train_config.seed)
    clip = ContinuousCLIP(UniTok(model_config)).to(device)
    params = [p for n, p in clip.unitok.named_parameters() if n.split(".")[0] in CLIP_PARTS]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train_config.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=train_config.lr,
                            betas=tuple(train_config.betas), eps=train_config.eps)
    loss_fn = ClipLoss()
    sampler = StepBatchSampler(len(train_data), train_config.batch_size, train_config.seed)
    loader = iter(DataLoader(train_data, batch_sampler=sampler, collate_fn=default_collate))
    clip.train()
    seconds = 0.0
    for step in tqdm(range(train_config.steps), disable=not progress, desc="clip pre-training"):
        start = time.perf_counter()
        batch = next(loader)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, train_config)
        images = batch["image"].to(device)
        scale = clip.unitok.logit_scale.clamp(max=model_config.logit_scale_max).exp()
        image, text = clip.encode_image(images), clip.encode_text(list(batch["caption"]))
        loss = loss_fn(image, text, scale)
        if model_config.hard_negative_weight and "negative_caption" in batch:   # the tokenizer's contrastive terms
            negative = clip.encode_text(list(batch["negative_caption"]))
            loss = loss + model_config.hard_negative_weight * hard_negative_loss(image, text, negative, scale)
        if not torch.isfinite(loss):
            raise RuntimeError(f"the CLIP pre-training loss became {float(loss)} at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, train_config.grad_clip)
        opt.step()
        with torch.no_grad():
            clip.unitok.logit_scale.clamp_(0, model_config.logit_scale_max)
        seconds += time.perf_counter() - start
    out = {"state": clip.clip_state_dict(), "seconds": seconds}
    out.update(_clip_zero_shot(clip, eval_data or {}, train_config.batch_size, device))
    return out


@torch.no_grad()
def _clip_zero_shot(clip: ContinuousCLIP, eval_data: dict, batch_size: int, device) -> dict:
    """Zero-shot top-1 of a ContinuousCLIP on the headline task of each zero-shot set."""
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate

    from ..evaluation.zero_shot import zero_shot_accuracy, zero_shot_classifier

    out = {}
    clip.eval()
    for key, suffix in (("zero_shot", ""), ("zero_shot_heldout", "_heldout")):
        ds = eval_data.get(key)
        if ds is None or not hasattr(ds, "zero_shot_tasks"):
            continue
        classnames, templates, label_key = next(iter(ds.zero_shot_tasks().values()))
        feats, labels = [], []
        for batch in DataLoader(ds, batch_size=batch_size, collate_fn=default_collate):
            feats.append(clip.encode_image(batch["image"].to(device)).float())
            labels.append(batch["labels"][label_key])
        classifier = zero_shot_classifier(clip, classnames, templates, device=device)
        out[f"zero_shot_top1{suffix}"] = zero_shot_accuracy(torch.cat(feats), torch.cat(labels), classifier)["top1"]
    return out


def pretrained_clip(spec: dict, root: Path, model_config, train_config, train_data, eval_data, device,
                    log: Callable) -> dict:
    """The pre-trained CLIP for a clip-initialised tokenizer: trained once per (config, seed) into its own folder."""
    from safetensors.torch import load_file, save_file

    from ..checkpoint import atomic_write
    from ..tokenizer.config import apply_overrides, Preset
    from ..training.runs import atomic_write_text, claim_run_folder

    steps = spec["clip_pretrain"]["steps"]
    pre_spec = {"kind": "clip", "model": spec["model"], "train": {**spec["train"], "steps": steps},
                "data": spec["data"]}
    folder = root / "runs" / f"clip-{spec_hash(pre_spec)}"
    done = read_json(folder / "result.json")
    if done is not None and (folder / "clip.safetensors").is_file():
        return {"state": load_file(str(folder / "clip.safetensors")), **done}
    with claim_run_folder(folder, resume=True, command="unitok ablate (CLIP pre-training)"):
        atomic_write_text(folder / "config.json", json.dumps(pre_spec, indent=2))
        pre_train = apply_overrides(Preset(model_config, train_config), {"train.steps": steps}).train
        log(f"  CLIP pre-training: {steps} steps -> {folder}")
        out = pretrain_clip(model_config, pre_train, train_data, eval_data, device=device)
        atomic_write(folder / "clip.safetensors", lambda p: save_file(out["state"], p))
        meta = {k: v for k, v in out.items() if k != "state"}
        atomic_write_text(folder / "result.json", json.dumps(meta, indent=2))
    return out

