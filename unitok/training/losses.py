"""UniTok's training objective: reconstruction + VQ + CLIP contrastive, with the reference's weights.

    total = l1_weight * |x - x_hat|_1 + l2_weight * |x - x_hat|^2 + vq_weight * L_vq + clip_weight * L_clip

(0.2, 1.0, 1.0, 1.0 in the reference; pixels in [-1, 1]). With lpips_weight > 0 the perceptual term
lpips_weight * LPIPS-VGG(x_hat, x) joins (the full objective; the GAN term is `unitok.training.discriminator`). L_clip is
open_clip's symmetric InfoNCE `ClipLoss`; under DDP it gathers features from every rank so the contrastive batch
is the global batch. With hard_negative_weight > 0 and texts = B captions + B hard negatives (each image's
caption with its shape swapped), clip_weight * hard_negative_weight * L_hn joins (`hard_negative_loss`).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from ..tokenizer.config import ModelConfig
from ..tokenizer.model import UniTokOutput


def hard_negative_loss(image: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """Mean over images of -log softmax(scale * [cos(image, caption), cos(image, swapped caption)])[0].

    image, positive, negative: (B, E) unit-norm features; row i of `negative` is image i's own caption with one
    word (the shape) swapped, so the only way to prefer the true caption is to see that word in the image.
    Purely local (no gathering under DDP): each image meets only its own swapped caption.
    """
    logits = logit_scale * torch.stack([(image * positive).sum(-1), (image * negative).sum(-1)], dim=1)  # (B, 2)
    return F.cross_entropy(logits, torch.zeros(len(image), dtype=torch.long, device=image.device))


class UniTokLoss:
    """Callable: (UniTokOutput, images) -> dict of named scalar terms, with "total" the weighted sum."""

    def __init__(self, config: ModelConfig, rank: int = 0, world_size: int = 1, perceptual=None):
        """perceptual: the frozen LPIPS module for lpips_weight > 0; None builds it from the default weight file
        (`unitok.training.discriminator.build_lpips`, a FileNotFoundError naming the file when it is missing)."""
        from open_clip import ClipLoss

        self.config = config
        if config.lpips_weight and perceptual is None:
            from .discriminator import build_lpips

            perceptual = build_lpips()
        self.perceptual = perceptual if config.lpips_weight else None
        # local_loss=False + gather_with_grad=True: every rank computes the loss over the global batch.
        self.clip_loss = ClipLoss(local_loss=False, gather_with_grad=world_size > 1, cache_labels=True,
                                  rank=rank, world_size=world_size)

    def __call__(self, out: UniTokOutput, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        cfg = self.config
        recon = out.reconstruction.float()
        terms = {
            "l1": F.l1_loss(recon, images),
            "l2": F.mse_loss(recon, images),
            "vq": out.vq_loss,
        }
        if self.perceptual is not None:
            self.perceptual.to(recon.device)
            terms["lpips"] = self.perceptual(recon, images).mean()
        if out.text_features is not None and cfg.clip_weight:
            image, text = out.image_features.float(), out.text_features.float()
            B = image.shape[0]
            negatives = text[B:]          # (B, E) when the trainer appended one hard-negative caption per image
            terms["clip"] = self.clip_loss(image, text[:B], out.logit_scale)
            if len(negatives):
                terms["hard_negative"] = hard_negative_loss(image, text[:B], negatives, out.logit_scale)
        if out.entropy_loss is not None:
            terms["entropy"] = out.entropy_loss.detach()  # already inside vq_loss, weighted; logged for insight
        weights = {"l1": cfg.l1_weight, "l2": cfg.l2_weight, "vq": cfg.vq_weight, "clip": cfg.clip_weight,
                   "lpips": cfg.lpips_weight, "hard_negative": cfg.clip_weight * cfg.hard_negative_weight}
        terms["total"] = sum(weights[name] * value for name, value in terms.items() if name in weights)
        return terms
