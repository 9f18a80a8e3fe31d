"""The full objective's extra terms: LPIPS perceptual loss and a DINOv2-feature GAN with an adaptive weight.

    generator:      total += lpips_weight * LPIPS(x_hat, x)                                (in UniTokLoss)
                    total += gan_weight * ramp(step) * d_weight * (-mean D(x_hat))        (AdversarialLoss)
    d_weight      = 0.4 * |grad_last L_nll| / (|grad_last L_gan| + 1e-4), clamped to [0, 1e4], no gradient
                    (VQGAN's adaptive weight; L_nll = 0.2 L1 + L2 + LPIPS, "last" = the decoder's last weight)
    ramp(step)    = 0 before gan_start * steps (37.5 %), then linear up to 1 over gan_warmup * steps
    discriminator:  hinge  mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))
                    + 4 * consistency: mean((D(x) - D'(x))^2) + mean((D(x_hat) - D'(x_hat))^2), where D and D' see two
                    independent DiffAug draws of the same images (balanced consistency regularisation)
                    its own AdamW (lr 2e-5, betas (0.5, 0.9)), stepped right after the generator in the same step

D: a frozen DINOv2 ViT-S/14 (timm `vit_small_patch14_dinov2`) reads the image (resized to 224 px, ImageNet
normalisation); its patch tokens after blocks 2, 5, 8, 11 and after the final norm (5 layers) each go through a small
trainable head of 1-D convolutions over the tokens (spectral norm, local batch norm, leaky ReLU, a residual conv with
kernel 9), giving one logit per token and layer. DiffAug (colour, translation, cutout) is applied before D, on real
and reconstructed images alike, so D cannot win by memorising.

Weights (docs/reference_checkpoint.md): both frozen networks need pretrained weights for the objective to mean
anything; they are read from local files, never downloaded silently, and a missing file stops training before it
starts with a message naming the file and where to get it. `"random"` (for tests) uses random backbones.
"""
from __future__ import annotations

import contextlib
import math
import os
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

EXTERNAL_REPO = "FoundationVision/unitok_external"
EXTERNAL_ENV = "UNITOK_EXTERNAL"          # a folder holding the files below (the hub repo's layout)
LPIPS_FILE = "lpips_with_vgg.pth"          # LPIPS linear heads + VGG16 features, one state dict
DINO_FILE = "dinov2_vits14_pretrain.pth"   # Meta's DINOv2 ViT-S/14 checkpoint
TORCHVISION_VGG16 = "vgg16-397923af.pth"   # torchvision's ImageNet VGG16, an alternative source of the VGG part
DINO_LAYERS = (2, 5, 8, 11)                # blocks whose tokens feed a head; the final normed tokens are the 5th


# ---------------------------------------------------------------------------------------------------------------
# finding weight files
# ---------------------------------------------------------------------------------------------------------------
def find_external(filename: str, configured: str = "", alternatives: Sequence[Path] = ()) -> Path:
    """The local path of a loss network's weight file, or FileNotFoundError naming it and where to get it.

    Looks at, in order: `configured` (a file, or a folder holding it), $UNITOK_EXTERNAL/, ./unitok_external/,
    the Hugging Face cache of FoundationVision/unitok_external, then `alternatives`. Never downloads.
    """
    candidates = []
    if configured:
        p = Path(configured).expanduser()
        candidates.append(p / filename if p.is_dir() else p)
    if os.environ.get(EXTERNAL_ENV):
        candidates.append(Path(os.environ[EXTERNAL_ENV]).expanduser() / filename)
    candidates.append(Path("unitok_external") / filename)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(EXTERNAL_REPO, filename)
        if isinstance(cached, str):
            candidates.append(Path(cached))
    except Exception:  # no cache folder at all: nothing to find there
        pass
    candidates.extend(alternatives)
    for path in candidates:
        if path.is_file():
            return path
    if configured:
        raise FileNotFoundError(f"{configured}: no such file; expected {filename} (see docs/reference_checkpoint.md)")
    raise FileNotFoundError(
        f"{filename} not found: the full objective needs its pretrained weights and never trains with random ones "
        f"silently. Get it with `huggingface-cli download {EXTERNAL_REPO} {filename} --local-dir unitok_external` "
        f"(or from https://huggingface.co/{EXTERNAL_REPO}), then put it in ./unitok_external/, set "
        f"{EXTERNAL_ENV}=<folder>, or pass its path with --set train.{'lpips' if 'lpips' in filename else 'dino'}"
        f"_weights=<path>"
        + (f" (torchvision's {TORCHVISION_VGG16} in {_torch_cache_vgg().parent} also works)" if "lpips" in filename
           else "")
        + f". Or switch the term off: --set model.{'lpips' if 'lpips' in filename else 'gan'}_weight=0.")


def check_loss_weights(model_config, train_config) -> None:
    """Raise FileNotFoundError before training starts if an enabled term's weight file is missing."""
    if model_config.lpips_weight and train_config.lpips_weights != "random":
        _lpips_source(train_config.lpips_weights)
    if model_config.gan_weight and train_config.dino_weights != "random":
        find_external(DINO_FILE, train_config.dino_weights)


def _torch_cache_vgg() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / TORCHVISION_VGG16


def _lpips_source(configured: str) -> Path:
    return find_external(LPIPS_FILE, configured, alternatives=[_torch_cache_vgg()])


def _read(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model"):  # some files wrap the state dict once
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


# ---------------------------------------------------------------------------------------------------------------
# LPIPS
# ---------------------------------------------------------------------------------------------------------------
_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # lpips' five VGG16 slices over torchvision's `features`


def build_lpips(weights: str = "") -> nn.Module:
    """A frozen LPIPS-VGG module: (B, 3, H, W) x2 in [-1, 1] -> (B, 1, 1, 1) distances.

    weights: "" (search, see `find_external`), a path to `lpips_with_vgg.pth` (LPIPS state dict: `net.slice*`,
    `lin*`) or to torchvision's `vgg16-397923af.pth` (then the linear heads come from the lpips package), or
    "random" (random VGG, the package's heads: tests only).
    """
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips builds torchvision's VGG with the deprecated `pretrained=` argument
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # heads from the package
    if weights != "random":
        path = _lpips_source(weights)
        state = _read(path)
        own = model.state_dict()
        if any(k.startswith("features.") for k in state):  # torchvision's VGG16: only the backbone
            mapped = {}
            for i, (lo, hi) in enumerate(_VGG_SLICES):
                for j in range(lo, hi):
                    for kind in ("weight", "bias"):
                        if f"features.{j}.{kind}" in state:
                            mapped[f"net.slice{i + 1}.{j}.{kind}"] = state[f"features.{j}.{kind}"]
            needed = {k for k in own if k.startswith("net.")}
        else:
            mapped = dict(state)
            for k in list(mapped):  # the package lists its heads twice (lin{i} and lins.{i}); files may have either
                if k.startswith("lin") and not k.startswith("lins."):
                    mapped.setdefault("lins." + k[3:], mapped[k])
                elif k.startswith("lins."):
                    mapped.setdefault("lin" + k[5:], mapped[k])
            needed = {k for k in own if k.startswith(("net.", "lin"))}
        missing = sorted(needed - set(mapped))
        unexpected = sorted(set(mapped) - set(own))
        if missing or unexpected:
            raise ValueError(f"{path}: not an LPIPS-VGG state dict; missing {missing[:4]}, unexpected {unexpected[:4]}")
        model.load_state_dict({**own, **mapped})
    model.eval().requires_grad_(False)
    return model


# ---------------------------------------------------------------------------------------------------------------
# DiffAug: differentiable augmentation applied to real and fake images before the discriminator
# ---------------------------------------------------------------------------------------------------------------
def diff_augment(x: torch.Tensor, translation: float = 0.125, cutout: float = 0.5,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Colour (brightness, saturation, contrast), translation (1/8, zero padding) and cutout (1/2) per image.

    x: (B, C, H, W) in [-1, 1]; differentiable w.r.t. x; randomness from `generator` (default: torch's global one).
    """
    B, _, H, W = x.shape
    dev, dt = x.device, x.dtype
    g = {"generator": generator}
    x = x + (torch.rand(B, 1, 1, 1, device=dev, dtype=dt, **g) - 0.5)                                  # brightness
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (torch.rand(B, 1, 1, 1, device=dev, dtype=dt, **g) * 2) + mean                  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (torch.rand(B, 1, 1, 1, device=dev, dtype=dt, **g) + 0.5) + mean                # contrast
    # translation by up to 1/8 of the size, the uncovered border filled with zeros
    sh, sw = int(H * translation + 0.5), int(W * translation + 0.5)
    ty = torch.randint(-sh, sh + 1, (B, 1, 1), device=dev, **g)
    tx = torch.randint(-sw, sw + 1, (B, 1, 1), device=dev, **g)
    gy, gx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    gy = (gy.unsqueeze(0) + ty).clamp(-1, H)
    gx = (gx.unsqueeze(0) + tx).clamp(-1, W)
    padded = F.pad(x, (1, 1, 1, 1))
    x = padded.permute(0, 2, 3, 1)[torch.arange(B, device=dev)[:, None, None], gy + 1, gx + 1].permute(0, 3, 1, 2)
    # cutout: one square of half the size per image (centre anywhere, clipped at the border), zeroed
    ch, cw = int(H * cutout + 0.5), int(W * cutout + 0.5)
    top = torch.randint(0, H + (1 - ch % 2), (B, 1, 1), device=dev, **g) - ch // 2
    left = torch.randint(0, W + (1 - cw % 2), (B, 1, 1), device=dev, **g) - cw // 2
    gy, gx = torch.meshgrid(torch.arange(H, device=dev), torch.arange(W, device=dev), indexing="ij")
    inside = (gy >= top) & (gy < top + ch) & (gx >= left) & (gx < left + cw)              # (B, H, W)
    return x * (~inside).unsqueeze(1).to(dt)


# ---------------------------------------------------------------------------------------------------------------
# the discriminator
# ---------------------------------------------------------------------------------------------------------------
class BatchNormLocal(nn.Module):
    """Batch norm over groups of `virtual_bs` samples and all tokens, no running statistics: (B, C, L) -> same."""

    def __init__(self, channels: int, virtual_bs: int = 8, eps: float = 1e-5):
        super().__init__()
        self.virtual_bs, self.eps = virtual_bs, eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        groups = math.ceil(B / self.virtual_bs) if B % self.virtual_bs == 0 else 1
        y = x.float().view(groups, B // groups, *x.shape[1:])
        mean, var = y.mean((1, 3), keepdim=True), y.var((1, 3), keepdim=True, unbiased=False)
        y = ((y - mean) / torch.sqrt(var + self.eps)).view_as(x)
        return (y * self.weight[None, :, None] + self.bias[None, :, None]).to(x.dtype)


class DiscHead(nn.Module):
    """Tokens (B, L, dim) -> logits (B, L): conv1x1 block, a residual conv(kernel 9, circular) block, conv1x1 -> 1."""

    def __init__(self, dim: int, channels: int = 64, kernel_size: int = 9):
        super().__init__()
        self.inp = nn.Sequential(spectral_norm(nn.Conv1d(dim, channels, 1)), BatchNormLocal(channels),
                                 nn.LeakyReLU(0.2))
        self.res = nn.Sequential(spectral_norm(nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2,
                                                         padding_mode="circular")),
                                 BatchNormLocal(channels), nn.LeakyReLU(0.2))
        self.out = spectral_norm(nn.Conv1d(channels, 1, 1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.inp(tokens.transpose(1, 2))
        x = (x + self.res(x)) / math.sqrt(2)
        return self.out(x).squeeze(1)


class DinoDiscriminator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> logits (B, 5 * L) (L = (image_size / 14)^2 tokens per layer).

    weights: "" (search for dinov2_vits14_pretrain.pth), a path, or "random" (tests). The backbone is frozen and
    always in eval mode; only the heads train.
    """

    def __init__(self, weights: str = "", image_size: int = 224, channels: int = 64):
        super().__init__()
        import timm

        if image_size % 14:
            raise ValueError(f"disc_image_size must be a multiple of 14 (DINOv2 patches), got {image_size}")
        self.image_size = image_size
        with torch.random.fork_rng(devices=[]):  # a random backbone (tests) is the same one in every run
            torch.manual_seed(0)
            self.backbone = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=image_size,
                                              num_classes=0)
        if weights != "random":
            from timm.models.vision_transformer import checkpoint_filter_fn

            path = find_external(DINO_FILE, weights)
            # Meta's file format -> timm's names, position table resampled to this image size
            state = checkpoint_filter_fn(_read(path), self.backbone)
            state = {k: v for k, v in state.items() if k != "mask_token"}
            try:
                self.backbone.load_state_dict(state)
            except RuntimeError as e:
                raise ValueError(f"{path}: not a DINOv2 ViT-S/14 checkpoint ({str(e).splitlines()[0]})") from None
        self.backbone.requires_grad_(False).eval()
        dim = self.backbone.embed_dim
        self.heads = nn.ModuleList([DiscHead(dim, channels) for _ in range(len(DINO_LAYERS) + 1)])
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout / drop-path, whatever the heads do
        return self

    def trainable_parameters(self):
        return self.heads.parameters()

    def forward(self, images: torch.Tensor, augment: bool = True,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        x = diff_augment(images, generator=generator) if augment else images
        # .float(): under bf16 autocast the reconstruction arrives in bf16, which antialiased resizing lacks on CPU
        x = F.interpolate(x.float(), size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                          antialias=x.shape[-1] > self.image_size)
        x = ((x + 1) / 2 - self.mean) / self.std
        feats = self.backbone.forward_intermediates(x, indices=list(DINO_LAYERS), norm=False, output_fmt="NLC",
                                                    intermediates_only=True)
        feats = list(feats) + [self.backbone.norm(feats[-1])]
        return torch.cat([head(f) for head, f in zip(self.heads, feats)], dim=1)


# ---------------------------------------------------------------------------------------------------------------
# the adversarial term and the discriminator's step, as the trainer uses them
# ---------------------------------------------------------------------------------------------------------------
def gan_ramp(step: int, total_steps: int, start: float, warmup: float) -> float:
    """The GAN's weight multiplier at `step` (0-based): 0 before start * total, then linear up to 1."""
    begin = start * total_steps
    if step < begin:
        return 0.0
    span = warmup * total_steps
    return 1.0 if span <= 0 else min(1.0, (step - begin + 1) / span)


def adaptive_weight(nll: torch.Tensor, gan: torch.Tensor, last_layer: torch.Tensor, scale: float = 0.4,
                    maximum: float = 1e4) -> torch.Tensor:
    """scale * |d nll / d last| / (|d gan / d last| + 1e-4), clamped to [0, maximum], detached (a scalar)."""
    g_nll = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(gan, last_layer, retain_graph=True)[0]
    return (scale * g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0.0, maximum).detach()


class AdversarialLoss:
    """Owns the discriminator and its optimizer; adds the GAN term to the generator's loss and steps D.

    Used by `unitok.training.tokenizer_trainer.Trainer` when `model.gan_weight > 0`:
        terms = adv.generator_terms(terms, reconstruction, last_layer, step, total_steps)   # before backward
        metrics.update(adv.discriminator_step(images, reconstruction.detach(), step, total_steps))  # after opt.step
    """

    def __init__(self, model_config, train_config, device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.cfg, self.autocast = model_config, autocast
        # DiffAug draws from its own generator (saved in checkpoints): a resumed run augments exactly as the
        # uninterrupted one, whatever else (data loading) draws from torch's global generator meanwhile.
        self.generator = torch.Generator(device=device).manual_seed(int(train_config.seed) + 1)
        self.disc = DinoDiscriminator(train_config.dino_weights, train_config.disc_image_size).to(device)
        self.optimizer = torch.optim.AdamW(list(self.disc.trainable_parameters()), lr=train_config.disc_lr,
                                           betas=tuple(train_config.disc_betas),
                                           weight_decay=train_config.disc_weight_decay)

    def ramp(self, step: int, total_steps: int) -> float:
        return gan_ramp(step, total_steps, self.cfg.gan_start, self.cfg.gan_warmup)

    def nll(self, terms: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The reconstruction part the adaptive weight balances against: 0.2 L1 + L2 (+ LPIPS)."""
        cfg = self.cfg
        out = cfg.l1_weight * terms["l1"] + cfg.l2_weight * terms["l2"]
        return out + cfg.lpips_weight * terms["lpips"] if "lpips" in terms else out

    def generator_terms(self, terms: Dict[str, torch.Tensor], reconstruction: torch.Tensor,
                        last_layer: torch.Tensor, step: int, total_steps: int) -> Dict[str, torch.Tensor]:
        """Add `g_loss`, `d_weight`, `gan_ramp` to `terms` and the weighted GAN term to `terms["total"]`."""
        ramp = self.ramp(step, total_steps)
        zero = terms["total"].detach() * 0
        if ramp == 0:  # before the GAN starts: nothing to compute (logged as zeros)
            return {**terms, "g_loss": zero, "d_weight": zero, "gan_ramp": zero}
        self.disc.requires_grad_(False)  # gradients flow to the image only, not into D's heads
        try:
            with self.autocast():
                g_loss = -self.disc(reconstruction, generator=self.generator).float().mean()
        finally:
            self.disc.heads.requires_grad_(True)
        d_weight = adaptive_weight(self.nll(terms), g_loss, last_layer, self.cfg.gan_adaptive_scale,
                                   self.cfg.gan_adaptive_max)
        total = terms["total"] + self.cfg.gan_weight * ramp * d_weight * g_loss
        return {**terms, "total": total, "g_loss": g_loss, "d_weight": d_weight, "gan_ramp": zero + ramp}

    def discriminator_step(self, real: torch.Tensor, fake: torch.Tensor, step: int,
                           total_steps: int) -> Dict[str, float]:
        """One AdamW step of D's heads on hinge + consistency loss; returns disc_loss, logits_real/fake, disc_cr."""
        if self.ramp(step, total_steps) == 0:
            return {"disc_loss": 0.0, "logits_real": 0.0, "logits_fake": 0.0, "disc_cr": 0.0}
        self.disc.train()
        fake = fake.detach()
        with self.autocast():  # real and fake separately (the heads' batch norm must not mix them), twice each:
            d = partial(self.disc, generator=self.generator)
            real_logits, fake_logits = d(real).float(), d(fake).float()  # two DiffAug draws
            real_again, fake_again = d(real).float(), d(fake).float()
        hinge = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        cr = F.mse_loss(real_logits, real_again) + F.mse_loss(fake_logits, fake_again)
        loss = hinge + self.cfg.disc_cr_weight * cr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in self.disc.trainable_parameters():  # one discriminator for all ranks: average its gradients
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world
        self.optimizer.step()
        values = torch.stack([loss.detach(), real_logits.detach().mean(), fake_logits.detach().mean(),
                              cr.detach()]).tolist()
        return dict(zip(("disc_loss", "logits_real", "logits_fake", "disc_cr"), values))

    def state_dict(self) -> dict:
        """The trainable heads (with their spectral-norm vectors) and the optimizer; the frozen backbone is
        re-read from its weight file (or re-made, for "random") and not stored in every checkpoint."""
        return {"disc": self.disc.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not isinstance(state, dict) or not {"disc", "optimizer", "generator"} <= set(state):
            raise ValueError("the checkpoint has no discriminator state (it was written with gan_weight=0); resume "
                             "with the settings it was trained with")
        self.disc.heads.load_state_dict(state["disc"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])
