"""Training and measuring a TokenGenerator on a frozen tokenizer's codes.

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> trainer = GeneratorTrainer.from_tokenizer(tok, "data/tiny-shapes", out_dir="runs/gen")
    >>> trainer.step()                  # {'step': 1, 'loss': ..., 'bits_per_subcode': ..., 'lr': ...}
    >>> trainer.run()                   # tqdm bar; held-out NLL and checkpoints on schedule
    >>> trainer.evaluate()              # held-out NLL: bits per sub-code and per image, seen and held-out pairs
    >>> evaluate_samples(trainer.generator)   # prompt accuracy, diversity, proxy FID, code usage of samples

Codes are extracted once from the frozen tokenizer (`extract_codes`, with a progress bar) and cached on disk under
`unitok.data.datasets.default_cache_dir()/codes/`; the file name carries the tokenizer's weight hash, so a changed tokenizer
never reuses stale codes. The trainer follows `unitok.training.tokenizer_trainer.Trainer`: `step()` / `run()` / `history` / callbacks,
exact resume (the data order is a pure function of (seed, step); the RNG state is saved), atomic checkpoints, a
NaN guard that stops before the bad update, DDP under torchrun, one run per folder (`unitok.training.runs`).

Prompt accuracy uses `ShapeClassifier`, a small CNN with a colour head and a shape head trained once on real
single-object shapes images (every colour x shape pair, held-out pairs included: it is the measuring instrument,
not the model under test) and cached next to the codes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..training.checkpoint import atomic_write, load_state_dict_checked, read_torch
from ..tokenizer.config import _coerce, _split_override
from ..data.datasets import ShapesDataset, build_dataset, default_cache_dir
from .model import GeneratorConfig, TokenGenerator, tokenizer_hash
from ..training.runs import RunLock, atomic_write_text, prepare_run_folder
from ..training.machine import pick_device, training_autocast, uses_bf16
from ..training.tokenizer_trainer import NonFiniteLossError, StepBatchSampler, _distributed, lr_at, seed_everything

COMMAND = "unitok train-generator"
PLAIN_CODES = ("tokenizer", "background", "plain")   # GeneratorTrainConfig.plain_codes, `blank_plain_codes`


@dataclass
class GeneratorTrainConfig:
    # twice the steps of half the batch: the same images and compute, twice the updates; 0.065 bits per sub-code
    # lower held-out NLL than 1500 x 64 and a closer colour (docs/generation.md); under 10 minutes on a 2-core AMX
    # CPU in bf16
    batch_size: int = 32
    steps: int = 3000
    lr: float = 2e-3                  # 1e-3 learned more slowly (docs/generation.md)
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.05
    eps: float = 1e-8
    warmup_fraction: float = 0.05     # linear warm-up, then cosine to min_lr_ratio * lr (unitok.training.tokenizer_trainer.lr_at)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    train_images: int = 20_000        # codes extracted once from this many training images (~6 epochs)
    eval_images: int = 512            # per held-out set (test split: seen pairs; heldout split: unseen pairs)
    # shapes: the share of captions without colours. The tokenizer's data leaves them out of half its captions (a
    # contrastive trick); a generator taught on those learns colour from half the data (docs/generation.md)
    p_no_colour: float = 0.0
    # the share of the spatial transformer's input sub-codes replaced by one of their `code_noise_neighbours`
    # nearest codes in the tokenizer's codebook (targets stay the true codes): sampling feeds the model its own
    # draws, which differ from the tokenizer's codes in many sub-codes, so it learns not to read a shape from them
    code_noise: float = 0.0
    code_noise_neighbours: int = 8
    # scheduled sampling on the model's own draws: this share of positions (ramped up linearly over the first
    # `self_feed_ramp` of training) reads, instead of the true codes, all k sub-codes drawn from the model's own
    # teacher-forced prediction (one extra forward pass without gradients, 1.4x the step time); targets stay the
    # true codes. Like code_noise it helps the plain setting's shape and colour a little, not the best shape
    # (docs/generation.md), so it is off by default
    self_feed: float = 0.0
    self_feed_ramp: float = 0.5
    # "background": background tokens (patches of the plain background colour) take the codes the tokenizer gives
    # a picture of that background alone; "plain": every plain patch likewise (`blank_plain_codes`); "tokenizer":
    # the codes as encoded. The encoder sees the whole image, so otherwise the same plain patch gets a different
    # 8-tuple in nearly every picture: noise the decoder ignores but the generator must learn (docs/generation.md).
    # Needs the images, so it applies when the codes are extracted. "background" took shape from 0.40 to 0.68 at
    # CFG 3 and the best setting's from 0.48 to 0.74; "plain" was worse than "background" (0.63)
    plain_codes: str = "background"
    eval_every: int = 250
    checkpoint_every: int = 250
    log_every: int = 10
    device: str = "auto"
    amp: bool = True                  # bf16 autocast on CUDA
    cpu_bf16: str = "auto"            # CPU: "off" (fp32), "on" or "auto" (bf16 where the CPU has AMX: 1.5x faster)

    @classmethod
    def from_saved(cls, saved: dict) -> "GeneratorTrainConfig":
        """A run folder's saved training config -> the config it was trained with: runs from before an option
        existed get what they used then, not today's default."""
        before = {"p_no_colour": 0.5,             # the tokenizer's captions
                  "plain_codes": "tokenizer"}     # the tokenizer's own background codes
        return cls(**{**before, **saved})

    def __post_init__(self):
        if not 0.0 <= self.code_noise < 1.0:
            raise ValueError(f"code_noise must lie in [0, 1) (a share of input sub-codes), got {self.code_noise!r}")
        if not 0.0 <= self.self_feed < 1.0:
            raise ValueError(f"self_feed must lie in [0, 1) (a share of input positions), got {self.self_feed!r}")
        if self.plain_codes not in PLAIN_CODES:
            raise ValueError(f"plain_codes must be one of {PLAIN_CODES}, got {self.plain_codes!r}")
        if not 0.0 <= self.self_feed_ramp <= 1.0:
            raise ValueError(f"self_feed_ramp must lie in [0, 1] (a share of the steps), got {self.self_feed_ramp!r}")


def apply_generator_overrides(gen: GeneratorConfig, train: GeneratorTrainConfig, overrides) -> tuple:
    """`key=value` overrides (a bare key, or `generator.key` / `train.key`) -> new (GeneratorConfig, TrainConfig)."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or [])
    g, t = dataclasses.asdict(gen), dataclasses.asdict(train)
    gtypes = {f.name: f.type for f in dataclasses.fields(GeneratorConfig)}
    ttypes = {f.name: f.type for f in dataclasses.fields(GeneratorTrainConfig)}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("generator", "model", "") and name in g and name != "class_names":
            g[name] = _coerce(key, value, gtypes[name], g[name])
        elif section in ("train", "") and name in t:
            t[name] = _coerce(key, value, ttypes[name], t[name])
        else:
            raise ValueError(f"unknown setting {key!r}; generator keys: {sorted(k for k in g if k != 'class_names')}; "
                             f"train keys: {sorted(t)}")
    t["betas"] = tuple(t["betas"])
    return GeneratorConfig(**g), GeneratorTrainConfig(**t)


# ---------------------------------------------------------------------------------------------------------------
# codes, extracted once and cached
# ---------------------------------------------------------------------------------------------------------------
class CodeSet(torch.utils.data.Dataset):
    """Tokenized images: codes (N, H, W, k) int16, text token ids (N, L) int32, labels {name: (N,) int64},
    captions (N strings). Item i -> {"codes": (H, W, k) int64, "ids": (L,), "labels": {...}, "caption": str}."""

    def __init__(self, codes: torch.Tensor, ids: torch.Tensor, labels: Dict[str, torch.Tensor], captions: List[str],
                 info: Optional[dict] = None):
        self.codes, self.ids, self.labels, self.captions = codes, ids, labels, list(captions)
        self.info = dict(info or {})

    def __len__(self) -> int:
        return self.codes.shape[0]

    def __getitem__(self, i: int) -> dict:
        return {"codes": self.codes[i].long(), "ids": self.ids[i].long(),
                "labels": {k: v[i] for k, v in self.labels.items()}, "caption": self.captions[i]}

    def batch(self, index) -> dict:
        """Gather many items at once (faster than collating): codes (B, H, W, k) int64, ids (B, L) int64, labels."""
        index = torch.as_tensor(index, dtype=torch.long)
        return {"codes": self.codes[index].long(), "ids": self.ids[index].long(),
                "labels": {k: v[index] for k, v in self.labels.items()},
                "caption": [self.captions[i] for i in index.tolist()]}


def _dataset_for(data: str, image_size: int, split: str, num_images: int, seed: int, p_no_colour: float):
    if data == "shapes":
        # held-out pairs appear only as single objects, so the seen-pair sets are single-object too: every set then
        # measures the same kind of picture
        return ShapesDataset(image_size, split, length=num_images, seed=seed,
                             max_objects=None if split == "train" else 1, p_no_colour=p_no_colour)
    ds = build_dataset(data, image_size, split=split)
    return torch.utils.data.Subset(ds, range(min(num_images, len(ds))))


@torch.no_grad()
def extract_codes(tokenizer, data: str = "shapes", split: str = "train", num_images: int = 20_000, seed: int = 0,
                  batch_size: int = 256, cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
                  digest: Optional[str] = None, p_no_colour: float = 0.0,
                  plain_codes: str = "tokenizer") -> CodeSet:
    """Encode `num_images` images of a dataset split with the frozen tokenizer, or load them from the cache.

    The cache file is `<cache_dir>/codes/<data>-<split>-<n>-seed<seed>-<px>[-pnc<p>][-blank<plain_codes>]-<hash>.pt`
    with the tokenizer's weight hash; `digest` is its `tokenizer_hash` when already known (it is recomputed
    otherwise). `p_no_colour` (shapes
    only): the share of captions that leave the colours out; 0 (the default) names every colour, since a
    text-to-image model can only learn to draw what its captions say (the tokenizer trains on 0.5).
    `plain_codes`: "background" / "plain" give plain patches the codes of their colour alone (`blank_plain_codes`).
    """
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    digest = digest or tokenizer_hash(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    captions = f"-pnc{p_no_colour:g}" if data == "shapes" else ""
    blank = "" if plain_codes == "tokenizer" else f"-blank{plain_codes}"
    path = cache / "codes" / (f"{data}-{split}-{num_images}-seed{seed}-{tokenizer.config.image_size}px{captions}"
                              f"{blank}-{digest[:16]}.pt")
    if path.is_file():
        state = read_torch(path, what="a cached code file")
        if state.get("tokenizer_sha256") == digest:
            return CodeSet(state["codes"], state["ids"], state["labels"], state["captions"],
                           {"cache": str(path), "tokenizer_sha256": digest})
    ds = _dataset_for(data, tokenizer.config.image_size, split, num_images, seed, p_no_colour)
    device = tokenizer.logit_scale.device
    was_training = tokenizer.training
    tokenizer.eval()
    codes, ids, captions, labels = [], [], [], {}
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False)
    for batch in tqdm(loader, desc=f"tokenizing {data}/{split}", disable=not progress):
        images = batch["image"].to(device)
        grid = tokenizer.encode(images)
        grid = blank_plain_codes(tokenizer, images, grid, plain_codes)
        codes.append(grid.to("cpu", torch.int16))
        ids.append(tokenizer.tokenize(list(batch["caption"])).to(torch.int32))
        captions.extend(batch["caption"])
        for k, v in batch["labels"].items():
            labels.setdefault(k, []).append(v.long())
    tokenizer.train(was_training)
    state = {"codes": torch.cat(codes), "ids": torch.cat(ids), "labels": {k: torch.cat(v) for k, v in labels.items()},
             "captions": captions, "tokenizer_sha256": digest}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return CodeSet(state["codes"], state["ids"], state["labels"], captions, {"cache": str(path),
                                                                            "tokenizer_sha256": digest})


def extract_run_codes(tokenizer, data: str, train: "GeneratorTrainConfig", digest: Optional[str] = None,
                      progress: bool = True) -> tuple:
    """The codes a training run uses -> (train CodeSet, {"test": CodeSet[, "heldout": CodeSet for shapes]})."""
    kw = dict(progress=progress, digest=digest, p_no_colour=train.p_no_colour,
              plain_codes=train.plain_codes)
    codes = extract_codes(tokenizer, data, "train", train.train_images, train.seed, **kw)
    splits = ("test", "heldout") if data == "shapes" else ("test",)
    return codes, {s: extract_codes(tokenizer, data, s, train.eval_images, train.seed, **kw) for s in splits}


def plain_colour_mask(images: torch.Tensor, patch: int, tol: float = 0.02,
                      among: Optional[torch.Tensor] = None) -> tuple:
    """images (B, C, S, S) -> (mask (B, S/patch, S/patch) bool, colour (B, C)): the patches of one plain colour
    and that colour. A patch is plain when no pixel is more than `tol` from the patch's mean in any channel; the
    colour is the per-channel median of the means of the plain patches (of those in `among`, a (B, g, g) mask, when
    given), so the first call finds the background, which covers most of a picture; `mask` holds the plain patches
    whose mean lies within `tol` of it. An image with no such patch gets an empty mask."""
    tiles = images.unfold(2, patch, patch).unfold(3, patch, patch)               # (B, C, g, g, p, p)
    mean = tiles.mean((-1, -2))                                                  # (B, C, g, g)
    plain = (tiles - mean[..., None, None]).abs().amax((1, -1, -2)) < tol        # (B, g, g)
    if among is not None:
        plain = plain & among
    means = mean.flatten(2).transpose(1, 2).masked_fill(~plain.flatten(1)[..., None], float("nan"))  # (B, N, C)
    colour = means.nanmedian(1).values.nan_to_num(0.0)                          # (B, C)
    near = (mean - colour[..., None, None]).abs().amax(1) < tol
    return plain & near, colour


@torch.no_grad()
def blank_plain_codes(tokenizer, images: torch.Tensor, codes: torch.Tensor, which: str = "background",
                      tol: float = 0.02, max_colours: int = 4) -> torch.Tensor:
    """images (B, C, S, S), their codes (B, H, W, k) -> codes in which plain patches hold the code the tokenizer
    gives, at that position, to a picture of that one colour alone.

    which: "background" replaces the background's tokens (`plain_colour_mask`); "plain" also every other plain
    patch (an object's flat interior), one colour at a time, up to `max_colours`; "tokenizer" changes nothing.
    The encoder attends over the whole image, so a plain patch's k sub-codes depend on what else is in the picture:
    on the shapes test images 99.4 % of background tokens differ from the blank picture's in at least one
    sub-code, while decoding with the blank picture's codes changes nothing the classifier can see
    (docs/generation.md). One extra encoder pass per colour.
    """
    if which not in PLAIN_CODES:
        raise ValueError(f"plain_codes must be one of {PLAIN_CODES}, got {which!r}")
    patch = tokenizer.config.image_size // tokenizer.config.grid_size
    left = torch.ones(codes.shape[:3], dtype=torch.bool, device=images.device)
    for _ in range(0 if which == "tokenizer" else 1 if which == "background" else max_colours):
        mask, colour = plain_colour_mask(images, patch, tol, among=left)
        if not mask.any():
            break
        blank = tokenizer.encode(colour[..., None, None].expand_as(images).contiguous())
        codes = torch.where(mask[..., None].to(codes.device), blank, codes)
        left = left & ~mask
    return codes


# ---------------------------------------------------------------------------------------------------------------
# input noise
# ---------------------------------------------------------------------------------------------------------------
def code_neighbours(codebooks: torch.Tensor, n: int) -> torch.Tensor:
    """codebooks (k, K, d) unit-norm code vectors -> (k, K, n) indices of each code's n nearest other codes (by
    cosine) in its own sub-codebook."""
    if not 1 <= n < codebooks.shape[1]:
        raise ValueError(f"code_noise_neighbours must lie in [1, {codebooks.shape[1] - 1}], got {n}")
    sim = codebooks.float() @ codebooks.float().transpose(1, 2)          # (k, K, K)
    sim.diagonal(dim1=1, dim2=2).fill_(-math.inf)                          # never "replace" a code by itself
    return sim.topk(n, dim=-1).indices


def corrupt_codes(codes: torch.Tensor, neighbours: torch.Tensor, p: float) -> torch.Tensor:
    """Replace each sub-code of codes (B, H, W, k) with probability p by a random one of its nearest codes
    (neighbours (k, K, n) from `code_neighbours`) -> a new tensor. Draws from the global torch RNG, whose state a
    checkpoint carries, so a resumed run corrupts exactly as the uninterrupted one."""
    k, n = neighbours.shape[0], neighbours.shape[-1]
    device = codes.device
    hit = (torch.rand(codes.shape) < p).to(device)          # drawn on the CPU: the same numbers on any device
    pick = torch.randint(n, codes.shape).to(device)
    book = torch.arange(k, device=device).expand(codes.shape)
    return torch.where(hit, neighbours.to(device)[book, codes, pick], codes)


def self_feed_share(step: int, config: "GeneratorTrainConfig") -> float:
    """The share of positions fed the model's own draws at this step: a linear ramp from 0 to
    config.self_feed over the first config.self_feed_ramp of the steps (the early model's draws are noise)."""
    ramp = config.self_feed_ramp * config.steps
    return config.self_feed * (1.0 if ramp <= 0 else min(1.0, step / ramp))


@torch.no_grad()
def mix_own_draws(logits: torch.Tensor, codes: torch.Tensor, p: float) -> torch.Tensor:
    """Scheduled sampling. logits (B, N, k, K) of a teacher-forced pass, codes (B, H, W, k) -> a copy of codes in
    which each position, with probability p, holds all k sub-codes drawn (temperature 1) from those logits. Draws
    from the global torch RNG on the CPU (the checkpoint carries it: exact resume, the same on any device)."""
    B, N, k, K = logits.shape
    hit = (torch.rand(B, N, 1) < p).to(codes.device)
    u = torch.rand(B, N, k, 1).to(logits.device)
    cdf = logits.float().softmax(-1).cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[..., -1:]).contiguous()).squeeze(-1).clamp_(max=K - 1)
    flat = codes.reshape(B, N, k)
    return torch.where(hit, drawn.to(codes.device), flat).view(codes.shape)


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class GeneratorTrainer:
    """Trains a TokenGenerator one step at a time (same conventions as `unitok.training.tokenizer_trainer.Trainer`).

    Args:
        gen_config, train_config: the two printable configs.
        tokenizer: the frozen UniTok (its text tower encodes captions; its decoder draws samples).
        train_codes: a CodeSet of training images; eval_codes: {"test": CodeSet, "heldout": CodeSet} for evaluate().
        out_dir: run folder (config.json, metrics.jsonl, eval.jsonl, checkpoint.pt, best/, summary.json) or None.
        resume / overwrite: as for `unitok.training.tokenizer_trainer.Trainer` (a folder holding a run is refused without one of them).
        tokenizer_path: where the tokenizer lives on disk, recorded in saved generators so they load on their own.
        class_key: the label used for class conditioning (shapes: "colour_shape").
    """

    def __init__(self, gen_config: GeneratorConfig, train_config: GeneratorTrainConfig, tokenizer,
                 train_codes: CodeSet, eval_codes: Optional[Dict[str, CodeSet]] = None,
                 out_dir: Optional[Union[str, Path]] = None, resume: bool = False, overwrite: bool = False,
                 tokenizer_path: Optional[Union[str, Path]] = None, class_key: str = "colour_shape",
                 data_spec: Optional[dict] = None):
        self.gen_config, self.config = gen_config, train_config
        self.rank, self.world_size, local_rank = _distributed()
        if self.world_size > 1 and not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() and train_config.device in ("auto", "cuda") else "gloo"
            dist.init_process_group(backend)
        self.device = pick_device(train_config.device, local_rank)
        self.bf16 = uses_bf16(self.device, train_config.amp, train_config.cpu_bf16)   # checks the choice early
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = True
        if gen_config.condition == "class" and class_key not in train_codes.labels:
            raise ValueError(f"class conditioning needs the label {class_key!r}; the codes have labels "
                             f"{sorted(train_codes.labels)}")
        seed_everything(train_config.seed)
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        # built (and checked) before the run folder is touched; kept on the device the codes are corrupted on
        self.neighbours = (code_neighbours(self.tokenizer.quantizer.normalized_codebooks().detach(),
                                           train_config.code_noise_neighbours).to(self.device)
                           if train_config.code_noise else None)
        self.generator = TokenGenerator(gen_config, self.tokenizer).to(self.device)
        self.train_codes, self.eval_codes = train_codes, eval_codes or {}
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.class_key = class_key
        self.data_spec = data_spec or {}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._lock = None
        if self.out_dir is not None and self.is_main:
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite, command=COMMAND)
            self._lock = RunLock(self.out_dir, COMMAND).acquire()
            weakref.finalize(self, self._lock.release)
        self.optimizer = self._build_optimizer()
        self.sampler = StepBatchSampler(len(train_codes), train_config.batch_size, train_config.seed, self.rank,
                                        self.world_size)
        self.step_count, self.train_seconds = 0, 0.0
        self.history: List[dict] = []
        self.eval_history: List[dict] = []
        self.best_score = math.inf            # lowest held-out bits per sub-code so far
        self.callbacks: Dict[str, List[Callable]] = {"step": [], "eval": []}
        self._train_model = self.generator
        if self.world_size > 1:
            self._train_model = nn.parallel.DistributedDataParallel(
                self.generator, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if resume and self.out_dir is not None and (self.out_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.out_dir / "checkpoint.pt")
        if self.is_main and self.out_dir is not None:
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.run_config(), indent=2))

    def run_config(self) -> dict:
        return {"generator": dataclasses.asdict(self.gen_config), "train": dataclasses.asdict(self.config),
                "tokenizer": self.tokenizer_path, "data": self.data_spec, "class_key": self.class_key}

    @classmethod
    def from_tokenizer(cls, tokenizer, tokenizer_path=None, data: str = "shapes", preset: str = "tiny",
                       overrides=None, out_dir=None, resume: bool = False, overwrite: bool = False,
                       progress: bool = True) -> "GeneratorTrainer":
        """Build configs from a preset + overrides, extract (or load cached) codes, and make a trainer."""
        class_names = list(ShapesDataset.COLOUR_SHAPES) if data == "shapes" else []
        gen = GeneratorConfig.preset(preset, tokenizer=tokenizer, class_names=class_names,
                                     **({"num_classes": len(class_names)} if class_names else {}))
        gen, train = apply_generator_overrides(gen, GeneratorTrainConfig(), overrides)
        digest = tokenizer_hash(tokenizer)
        codes, evals = extract_run_codes(tokenizer, data, train, digest, progress)
        return cls(gen, train, tokenizer, codes, evals, out_dir=out_dir, resume=resume, overwrite=overwrite,
                   tokenizer_path=tokenizer_path, data_spec={"name": data, "tokenizer_sha256": digest})

    def close(self) -> None:
        """Release the run folder's lock."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        # decay on matrices only; embeddings of positions and of the null condition are not pulled towards zero
        decay, no_decay = [], []
        for name, p in self.generator.named_parameters():
            vector_like = p.ndim < 2 or name.endswith(("row_embed", "col_embed", "prefix_pos", "null_cond"))
            (no_decay if vector_like else decay).append(p)
        cfg = self.config
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                                 eps=cfg.eps, fused=self.device.type == "cuda")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def add_callback(self, event: str, fn: Callable) -> None:
        """event "step": fn(trainer, metrics) after every step; "eval": fn(trainer, results) after evaluate()."""
        if event not in self.callbacks:
            raise ValueError(f"event must be one of {sorted(self.callbacks)}, got {event!r}")
        self.callbacks[event].append(fn)

    def remove_callback(self, event: str, fn: Callable) -> None:
        if fn in self.callbacks.get(event, []):
            self.callbacks[event].remove(fn)

    # ------------------------------------------------------------------ conditions
    def condition_for(self, batch: dict) -> torch.Tensor:
        """A CodeSet batch -> the generator's condition input: class labels (B,) or frozen text states."""
        if self.gen_config.condition == "class":
            return batch["labels"][self.class_key].to(self.device)
        return self.generator.text_states_from_ids(batch["ids"])

    def _autocast(self):
        return training_autocast(self.device, self.config.amp, self.config.cpu_bf16)

    # ------------------------------------------------------------------ training
    def step(self) -> dict:
        """One optimisation step on the batch for this step number. Returns its metrics (also in `history`)."""
        start = time.perf_counter()
        batch = self.train_codes.batch(self.sampler.indices_for_step(self.step_count))
        codes = batch["codes"].to(self.device, non_blocking=True)
        cond = self.condition_for(batch)
        # label dropout from the global torch RNG, whose state the checkpoint carries (exact resume)
        drop = (torch.rand(codes.shape[0]) < self.gen_config.label_dropout).to(self.device)
        seen = corrupt_codes(codes, self.neighbours, self.config.code_noise) if self.neighbours is not None else None
        share = self_feed_share(self.step_count, self.config)
        if share > 0:   # what the model would have drawn at each position, given the true (or noised) past
            self._train_model.eval()
            with torch.no_grad(), self._autocast():
                own = self._train_model(codes, cond, drop, input_codes=seen).logits
            seen = mix_own_draws(own, codes if seen is None else seen, share)
        lr = lr_at(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._train_model.train()
        with self._autocast():
            out = self._train_model(codes, cond, drop, input_codes=seen)
        loss = float(out.loss.detach())                       # one host sync per step
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            last = self.last_checkpoint_step()
            kept = ("the generator keeps its weights from before this step" if self.out_dir is None else
                    f"no checkpoint has been written to {self.out_dir} yet" if last is None else
                    f"the last good checkpoint (step {last}) is kept in {self.out_dir}")
            raise NonFiniteLossError(f"the generator's loss became {loss} at step {self.step_count + 1}; training "
                                     f"stopped and {kept}.")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.generator.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        metrics = {"step": self.step_count, "lr": lr, "loss": loss, "bits_per_subcode": loss / math.log(2),
                   "grad_norm": float(grad_norm), "seconds": seconds,
                   "images_per_second": codes.shape[0] * self.world_size / seconds}
        self.history.append(metrics)
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for fn in self.callbacks["step"]:
            fn(self, metrics)
        return metrics

    def run(self, steps: Optional[int] = None, progress: bool = True) -> List[dict]:
        """Train until `steps` more steps are done (default: up to config.steps), evaluating and checkpointing on
        schedule. Returns the history. Safe to call repeatedly."""
        from tqdm.auto import tqdm

        target = self.config.steps if steps is None else self.step_count + steps
        bar = tqdm(total=max(0, target - self.step_count), disable=not (progress and self.is_main),
                   desc="train generator")
        try:
            while self.step_count < target:
                m = self.step()
                bar.update(1)
                if self.step_count % self.config.log_every == 0:
                    bar.set_postfix(bits=f"{m['bits_per_subcode']:.3f}")
                if self.config.eval_every and self.step_count % self.config.eval_every == 0:
                    self.evaluate()
                if self.config.checkpoint_every and self.step_count % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_images: Optional[int] = None) -> dict:
        """Held-out NLL, teacher-forced with the true condition: bits per sub-code and per image on each eval set
        ("test": seen colour x shape pairs; "heldout": pairs never trained on). Saves `best/` by the test NLL."""
        results = {"step": self.step_count}
        for name, codes in self.eval_codes.items():
            results.update({f"{k}_{name}": v for k, v in self.nll(codes, max_images).items()})
        self.eval_history.append(results)
        key = "bits_per_subcode_test" if "bits_per_subcode_test" in results else None
        if self.is_main and self.out_dir is not None:
            with open(self.out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(results) + "\n")
            if key and results[key] < self.best_score:
                self.best_score = results[key]
                self.save_generator(self.out_dir / "best")
        for fn in self.callbacks["eval"]:
            fn(self, results)
        return results

    @torch.no_grad()
    def nll(self, codes: CodeSet, max_images: Optional[int] = None, batch_size: int = 128) -> dict:
        """Mean NLL over a CodeSet: {"bits_per_subcode", "bits_per_image"} (image = H*W*k sub-codes)."""
        g = self.generator
        was_training = g.training
        g.eval()
        n = min(len(codes), max_images or len(codes))
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            batch = codes.batch(range(start, min(n, start + batch_size)))
            out = g(batch["codes"].to(self.device), self.condition_for(batch))
            total += float(out.loss) * batch["codes"].numel()
            count += batch["codes"].numel()
        g.train(was_training)
        per_subcode = total / count / math.log(2)
        cfg = self.gen_config
        return {"bits_per_subcode": per_subcode,
                "bits_per_image": per_subcode * cfg.num_positions * cfg.num_codebooks}

    # ------------------------------------------------------------------ saving
    def save_generator(self, directory: Union[str, Path]) -> Path:
        return self.generator.save_pretrained(directory, tokenizer_path=self.tokenizer_path,
                                              extra={"steps": self.step_count})

    def state_dict(self) -> dict:
        return {"model": self.generator.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "train_seconds": self.train_seconds, "best_score": self.best_score,
                "history": self.history, "eval_history": self.eval_history, "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Optional[Path]:
        """out_dir/checkpoint.pt, atomically (a crash mid-save keeps the previous one)."""
        if not self.is_main or self.out_dir is None:
            return None
        state = self.state_dict()
        atomic_write(self.out_dir / "checkpoint.pt", lambda tmp: torch.save(state, tmp))
        return self.out_dir / "checkpoint.pt"

    def last_checkpoint_step(self) -> Optional[int]:
        if self.out_dir is None or not (self.out_dir / "checkpoint.pt").exists():
            return None
        return int(read_torch(self.out_dir / "checkpoint.pt")["step"])

    def load_checkpoint(self, path: Union[str, Path]) -> None:
        """Restore everything `save_checkpoint` wrote; the next step continues exactly where it left off."""
        state = read_torch(path, what="a checkpoint.pt written by GeneratorTrainer.save_checkpoint")
        load_state_dict_checked(self.generator, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.best_score = float(state["best_score"])
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
        if self.is_main and self.out_dir is not None:  # drop log lines written after the checkpoint (a crash)
            for name, rows in (("metrics.jsonl", self.history), ("eval.jsonl", self.eval_history)):
                with open(self.out_dir / name, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        """summary.json (steps, train time, last held-out NLL, `extra` such as sample metrics) + final weights in
        out_dir/final/ (best/ holds the lowest held-out NLL)."""
        summary = {"steps": self.step_count, "train_seconds": round(self.train_seconds, 2),
                   "precision": "bf16" if self.bf16 else "fp32",
                   "parameters": self.generator.num_parameters(), "generator": dataclasses.asdict(self.gen_config),
                   "data": self.data_spec, "plain_codes": self.config.plain_codes}   # the NLL is over those codes
        summary.update(self.eval_history[-1] if self.eval_history else {})
        summary.update(extra or {})
        if self.is_main and self.out_dir is not None:
            self.save_generator(self.out_dir / "final")
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


# ---------------------------------------------------------------------------------------------------------------
# the measuring classifier
# ---------------------------------------------------------------------------------------------------------------
class ShapeClassifier(nn.Module):
    """A small CNN reading the primary object's colour and shape: images (B, 3, S, S) in [-1, 1] ->
    {"colour": (B, 8) logits, "shape": (B, 8) logits}."""

    def __init__(self, width: int = 32):
        super().__init__()

        def conv(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.features = nn.Sequential(conv(3, width, 1), conv(width, width, 1), conv(width, 2 * width, 2),
                                      conv(2 * width, 2 * width, 1), conv(2 * width, 4 * width, 2),
                                      conv(4 * width, 4 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.colour = nn.Linear(4 * width, len(ShapesDataset.COLOURS))
        self.shape = nn.Linear(4 * width, len(ShapesDataset.SHAPES))

    def forward(self, images: torch.Tensor) -> dict:
        f = self.features(images)
        return {"colour": self.colour(f), "shape": self.shape(f)}

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> dict:
        """images (B, 3, S, S) -> {"colour": (B,), "shape": (B,)} predicted indices."""
        self.eval()
        device = next(self.parameters()).device
        out = {"colour": [], "shape": []}
        for start in range(0, len(images), batch_size):
            logits = self(images[start:start + batch_size].to(device).float())
            for k in out:
                out[k].append(logits[k].argmax(-1).cpu())
        return {k: torch.cat(v) for k, v in out.items()}


def _real_images(split: str, n: int, image_size: int, seed: int) -> tuple:
    ds = ShapesDataset(image_size, split, length=n, seed=seed, max_objects=1)
    batch = torch.utils.data.default_collate([ds[i] for i in range(n)])
    return batch["image"], batch["labels"]


def load_shape_classifier(image_size: int = 32, cache_dir: Optional[Union[str, Path]] = None, steps: int = 600,
                          progress: bool = True) -> ShapeClassifier:
    """The cached classifier for this image size, trained on first use (one to two minutes on 2 CPU cores).

    Trained on 12 000 real single-object images: train split plus the held-out-pair split (every colour x shape
    pair). `classifier.accuracy` holds its accuracy on 1000 unseen test-split images and 500 held-out-pair images.
    """
    from tqdm.auto import tqdm

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache / f"shape_classifier_{image_size}px_{steps}steps_v1.pt"   # a quick (smoke) one never replaces it
    model = ShapeClassifier()
    if path.is_file():
        state = read_torch(path, what="a cached shape classifier")
        load_state_dict_checked(model, state["model"])
        model.accuracy = state["accuracy"]
        return model.eval()
    g = torch.Generator().manual_seed(0)
    torch_state = torch.get_rng_state()
    torch.manual_seed(0)
    xa, la = _real_images("train", 9000, image_size, seed=101)
    xb, lb = _real_images("heldout", 3000, image_size, seed=101)
    x = torch.cat([xa, xb])
    y = {k: torch.cat([la[k], lb[k]]) for k in ("colour", "shape")}
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    # callers may hold torch.no_grad() (evaluate_samples does): training the classifier needs gradients
    with torch.enable_grad():
        model.train()
        for _ in tqdm(range(steps), desc="shape classifier", disable=not progress):
            idx = torch.randint(0, len(x), (64,), generator=g)
            xb_ = x[idx]
            if torch.rand(1, generator=g).item() < 0.5:   # mirror: no shape here depends on left/right
                xb_ = xb_.flip(-1)
            out = model(xb_ + 0.03 * torch.randn(xb_.shape, generator=g))  # a little noise: samples are not pristine
            loss = F.cross_entropy(out["colour"], y["colour"][idx]) + F.cross_entropy(out["shape"], y["shape"][idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    torch.set_rng_state(torch_state)
    accuracy = {}
    for split, n in (("test", 1000), ("heldout", 500)):
        xt, lt = _real_images(split, n, image_size, seed=202)
        pred = model.predict(xt)
        for k in ("colour", "shape"):
            accuracy[f"{k}_{split}"] = float((pred[k] == lt[k]).float().mean())
    model.accuracy = accuracy
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save({"model": model.state_dict(), "accuracy": accuracy}, tmp))
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# sample metrics
# ---------------------------------------------------------------------------------------------------------------
def pair_prompts(heldout: bool = False) -> List[tuple]:
    """[(prompt, colour index, shape index)] in the short form "a {colour} {shape}": the 53 seen pairs, or the
    11 held-out pairs."""
    held = set(ShapesDataset.heldout_pairs)
    out = []
    for ci, c in enumerate(ShapesDataset.COLOURS):
        for si, s in enumerate(ShapesDataset.SHAPES):
            if ((c, s) in held) == heldout:
                out.append((f"a {c} {s}", ci, si))
    return out


@torch.no_grad()
def sample_pairs(generator: TokenGenerator, prompts: List[tuple], num: int, batch_prompts: int = 16,
                 seed: int = 0, **sampling) -> tuple:
    """Generate `num` samples per (prompt, colour, shape) -> (codes (P*num, H, W, k), images, colour, shape)."""
    codes, images = [], []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        c = generator.generate(prompts=[p for p, _, _ in chunk], num=num, seed=seed + start, **sampling)
        codes.append(c.cpu())
        images.append(generator.decode(c).cpu())
    colour = torch.tensor([ci for _, ci, _ in prompts]).repeat_interleave(num)
    shape = torch.tensor([si for _, _, si in prompts]).repeat_interleave(num)
    return torch.cat(codes), torch.cat(images), colour, shape


def _mean_pairwise_distance(images: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean RMS pixel distance (in [0, 1] units) between two images of the same group, over all such pairs."""
    dists = []
    for gid in groups.unique():
        x = images[groups == gid].flatten(1).float() / 2       # [-1, 1] -> distances in [0, 1] units
        if len(x) < 2:
            continue
        d = torch.cdist(x, x) / math.sqrt(x.shape[1])
        dists.append(d[torch.triu(torch.ones_like(d, dtype=torch.bool), 1)])
    return float(torch.cat(dists).mean()) if dists else float("nan")


@torch.no_grad()
def evaluate_samples(generator: TokenGenerator, num: int = 8, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, cfg_scale: float = 3.0, seed: int = 0, classifier=None,
                     fid: bool = True, heldout: bool = True, prompts: Optional[List[tuple]] = None,
                     rerank: int = 1) -> dict:
    """Sample `num` images per "a {colour} {shape}" prompt and measure them.

    prompt_colour_acc / prompt_shape_acc / prompt_both_acc: how often the classifier reads the prompted colour /
    shape / both (seen pairs; `_heldout` for the 11 held-out pairs); distinct_fraction: share of distinct code
    grids; diversity: mean RMS pixel distance between two samples of the same prompt, next to the same for real
    images of the same pair (diversity_real); fid_proxy: EfficientNet-Lite0 FID of seen-pair samples against real
    single-object test images (a proxy, not comparable to published FIDs); code_usage / code_perplexity of samples
    vs real test codes. rerank > 1: each sample is the best of that many draws by the tokenizer's image-text match
    (`TokenGenerator.generate`), a different sampler from the plain one; the sampling record says which.
    """
    from ..evaluation.codebook_stats import codebook_stats

    classifier = classifier or load_shape_classifier(generator.tokenizer.config.image_size)
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale, rerank=rerank)
    out = {"sampling": dict(sampling, num_per_prompt=num, seed=seed)}
    sets = [("", prompts or pair_prompts(False))] + ([("_heldout", pair_prompts(True))] if heldout else [])
    seen_images = seen_codes = None
    for suffix, plist in sets:
        codes, images, colour, shape = sample_pairs(generator, plist, num, seed=seed, **sampling)
        pred = classifier.predict(images)
        ok_c, ok_s = pred["colour"] == colour, pred["shape"] == shape
        out[f"prompt_colour_acc{suffix}"] = float(ok_c.float().mean())
        out[f"prompt_shape_acc{suffix}"] = float(ok_s.float().mean())
        out[f"prompt_both_acc{suffix}"] = float((ok_c & ok_s).float().mean())
        out[f"samples{suffix}"] = len(images)
        if not suffix:
            seen_images, seen_codes = images, codes
            groups = colour * 8 + shape
            out["distinct_fraction"] = len({c.numpy().tobytes() for c in codes}) / len(codes)
            out["diversity"] = _mean_pairwise_distance(images, groups)
    # real references: single-object test images of the same pairs
    tok = generator.tokenizer
    n_real = len(seen_images)
    real, labels = _real_images("test", n_real, tok.config.image_size, seed=seed + 7)
    out["diversity_real"] = _mean_pairwise_distance(real, labels["colour"] * 8 + labels["shape"])
    real_codes = torch.cat([tok.encode(real[i:i + 256].to(tok.logit_scale.device)).cpu()
                            for i in range(0, n_real, 256)])
    K = generator.config.codebook_size
    gs, rs = codebook_stats(seen_codes.reshape(-1, seen_codes.shape[-1]), K), \
        codebook_stats(real_codes.reshape(-1, real_codes.shape[-1]), K)
    out["code_usage"] = float(np.mean(gs["codebook_usage"]))
    out["code_usage_real"] = float(np.mean(rs["codebook_usage"]))
    out["code_perplexity"] = float(np.mean(gs["perplexity"]))
    out["code_perplexity_real"] = float(np.mean(rs["perplexity"]))
    if fid:
        from ..evaluation.fid import EfficientNetLite0Features, fid as fid_fn

        res = fid_fn(real, seen_images, EfficientNetLite0Features(), batch_size=64)
        out["fid_proxy"] = res["fid"] if isinstance(res, dict) else float(res)
        out["fid_proxy_images"] = n_real
    return out
