"""Training a TokenGenerator on a frozen tokenizer's codes: its two configs and the trainer.

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> trainer = GeneratorTrainer.from_tokenizer(tok, "data/tiny-shapes", out_dir="runs/gen")
    >>> trainer.step()                  # {'step': 1, 'loss': ..., 'bits_per_subcode': ..., 'lr': ...}
    >>> trainer.run()                   # tqdm bar; held-out NLL and checkpoints on schedule
    >>> trainer.evaluate()              # held-out NLL: bits per sub-code and per image, seen and held-out pairs
    >>> evaluate_samples(trainer.generator)   # unitok.evaluation.generator_scores: prompt accuracy, diversity, ...

The codes come from `unitok.generator.codes` (extracted once from the frozen tokenizer, cached by its weight hash),
the input noise and scheduled sampling from `unitok.generator.noise`. The trainer is a
`unitok.training.trainer.TrainerBase`: `step()` / `run()` / `history` / callbacks, exact resume (the data order is a
pure function of (seed, step); the RNG state is saved), atomic checkpoints, a NaN guard that stops before the bad
update, DDP under torchrun, one run per folder (`unitok.training.runs`); this file says only what differs. Samples are measured by
`unitok.evaluation.generator_scores.evaluate_samples`, with the shape classifier of
`unitok.evaluation.shape_classifier` as the judge.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..checkpoint import tokenizer_hash
from ..tokenizer.config import coerce_value, split_override
from ..data.shapes_dataset import ShapesDataset
from .codes import PLAIN_CODES, CodeSet, extract_run_codes
from .config import GeneratorConfig
from .model import TokenGenerator
from .noise import code_neighbours, corrupt_codes, mix_own_draws, self_feed_share
from ..training.trainer import StepBatchSampler, TrainerBase

COMMAND = "unitok train-generator"


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
    warmup_fraction: float = 0.05     # linear warm-up, then cosine to min_lr_ratio * lr (unitok.training.trainer.lr_at)
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
    compile: bool = False             # torch.compile the training forward (the trainer base applies it)
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
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides or [])
    g, t = dataclasses.asdict(gen), dataclasses.asdict(train)
    gtypes = {f.name: f.type for f in dataclasses.fields(GeneratorConfig)}
    ttypes = {f.name: f.type for f in dataclasses.fields(GeneratorTrainConfig)}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("generator", "model", "") and name in g and name != "class_names":
            g[name] = coerce_value(key, value, gtypes[name], g[name])
        elif section in ("train", "") and name in t:
            t[name] = coerce_value(key, value, ttypes[name], t[name])
        else:
            raise ValueError(f"unknown setting {key!r}; generator keys: {sorted(k for k in g if k != 'class_names')}; "
                             f"train keys: {sorted(t)}")
    t["betas"] = tuple(t["betas"])
    return GeneratorConfig(**g), GeneratorTrainConfig(**t)


def generator_configs(tokenizer, data: str = "shapes", preset: Optional[str] = "tiny", overrides=None,
                      saved: Optional[dict] = None) -> tuple:
    """The (GeneratorConfig, GeneratorTrainConfig) a command line asks for: the named preset -- or, with preset None
    and `saved` (a run folder's config.json), the saved run -- with the `key=value` overrides applied."""
    if preset is None and saved is not None:
        gen, train = GeneratorConfig.from_saved(saved["generator"]), GeneratorTrainConfig.from_saved(saved["train"])
    else:
        class_names = list(ShapesDataset.COLOUR_SHAPES) if data == "shapes" else []
        gen = GeneratorConfig.preset(preset or "tiny", tokenizer=tokenizer, class_names=class_names,
                                     **({"num_classes": len(class_names)} if class_names else {}))
        train = GeneratorTrainConfig()
    return apply_generator_overrides(gen, train, overrides)


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class GeneratorTrainer(TrainerBase):
    """Trains a TokenGenerator one step at a time; the run folder, checkpoints, schedule, `run` and the summary come
    from `unitok.training.trainer.TrainerBase`.

    Args:
        gen_config, train_config: the two printable configs.
        tokenizer: the frozen UniTok (its text tower encodes captions; its decoder draws samples).
        train_codes: a CodeSet of training images; eval_codes: {"test": CodeSet, "heldout": CodeSet} for evaluate().
        out_dir: run folder (config.json, metrics.jsonl, eval.jsonl, checkpoint.pt, best/, final/, summary.json).
        resume / overwrite: as for every trainer (a folder holding a run is refused without one of them).
        tokenizer_path: where the tokenizer lives on disk, recorded in saved generators so they load on their own.
        class_key: the label used for class conditioning (shapes: "colour_shape").
    """

    command = COMMAND
    progress_name = "train generator"
    best_metric, best_mode = "bits_per_subcode_test", "min"     # lowest held-out bits per sub-code
    no_decay_suffixes = ("row_embed", "col_embed", "prefix_pos", "null_cond")   # positions, the null condition

    def __init__(self, gen_config: GeneratorConfig, train_config: GeneratorTrainConfig, tokenizer,
                 train_codes: CodeSet, eval_codes: Optional[Dict[str, CodeSet]] = None,
                 out_dir: Optional[Union[str, Path]] = None, resume: bool = False, overwrite: bool = False,
                 tokenizer_path: Optional[Union[str, Path]] = None, class_key: str = "colour_shape",
                 data_spec: Optional[dict] = None):
        super().__init__(train_config)
        self.gen_config = gen_config
        if gen_config.condition == "class" and class_key not in train_codes.labels:
            raise ValueError(f"class conditioning needs the label {class_key!r}; the codes have labels "
                             f"{sorted(train_codes.labels)}")
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        # built (and checked) before the run folder is touched; kept on the device the codes are corrupted on
        self.neighbours = (code_neighbours(self.tokenizer.quantizer.codebook_vectors().detach(),
                                           train_config.code_noise_neighbours).to(self.device)
                           if train_config.code_noise else None)
        generator = TokenGenerator(gen_config, self.tokenizer).to(self.device)
        self.train_codes, self.eval_codes = train_codes, eval_codes or {}
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.class_key = class_key
        self.data_spec = data_spec or {}
        self.sampler = StepBatchSampler(len(train_codes), train_config.batch_size, train_config.seed, self.rank,
                                        self.world_size)
        self.start_run(generator, out_dir=out_dir, resume=resume, overwrite=overwrite)

    @property
    def generator(self) -> TokenGenerator:
        """The model being trained (the base calls it `model`)."""
        return self.model

    def run_config(self) -> dict:
        return {"generator": dataclasses.asdict(self.gen_config), "train": dataclasses.asdict(self.config),
                "tokenizer": self.tokenizer_path, "data": self.data_spec, "class_key": self.class_key}

    @classmethod
    def from_tokenizer(cls, tokenizer, tokenizer_path=None, data: str = "shapes", preset: str = "tiny",
                       overrides=None, out_dir=None, resume: bool = False, overwrite: bool = False,
                       progress: bool = True) -> "GeneratorTrainer":
        """Build configs from a preset + overrides, extract (or load cached) codes, and make a trainer."""
        gen, train = generator_configs(tokenizer, data, preset, overrides)
        digest = tokenizer_hash(tokenizer)
        codes, evals = extract_run_codes(tokenizer, data, train, digest, progress)
        return cls(gen, train, tokenizer, codes, evals, out_dir=out_dir, resume=resume, overwrite=overwrite,
                   tokenizer_path=tokenizer_path, data_spec={"name": data, "tokenizer_sha256": digest})

    # ------------------------------------------------------------------ the step
    def condition_for(self, batch: dict) -> torch.Tensor:
        """A CodeSet batch -> the generator's condition input: class labels (B,) or frozen text states."""
        if self.gen_config.condition == "class":
            return batch["labels"][self.class_key].to(self.device)
        return self.generator.text_states_from_ids(batch["ids"])

    def batch_for_step(self, step: int) -> dict:
        batch = self.train_codes.batch(self.sampler.indices_for_step(step))
        batch["codes"] = batch["codes"].to(self.device, non_blocking=True)
        return batch

    def loss_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        codes = batch["codes"]
        cond = self.condition_for(batch)
        # label dropout from the global torch RNG, whose state the checkpoint carries (exact resume)
        drop = (torch.rand(codes.shape[0]) < self.gen_config.label_dropout).to(self.device)
        seen = corrupt_codes(codes, self.neighbours, self.config.code_noise) if self.neighbours is not None else None
        share = self_feed_share(self.step_count, self.config)
        if share > 0:   # what the model would have drawn at each position, given the true (or noised) past
            self.train_model.eval()
            with torch.no_grad(), self.autocast():
                own = self.train_model(codes, cond, drop, input_codes=seen).logits
            seen = mix_own_draws(own, codes if seen is None else seen, share)
            self.train_model.train()
        with self.autocast():
            out = self.train_model(codes, cond, drop, input_codes=seen)
        return {"loss": out.loss}

    def step_metrics(self, batch: dict, terms: Dict[str, float], seconds: float) -> dict:
        return {"bits_per_subcode": terms["loss"] / math.log(2),
                "images_per_second": batch["codes"].shape[0] * self.world_size / seconds}

    def progress_postfix(self, metrics: dict) -> dict:
        return {"bits": f"{metrics['bits_per_subcode']:.3f}"}

    # ------------------------------------------------------------------ evaluation
    def evaluation(self, max_images: Optional[int] = None) -> dict:
        """Held-out NLL, teacher-forced with the true condition: bits per sub-code and per image on each eval set
        ("test": seen colour x shape pairs; "heldout": pairs never trained on). best/ follows the test NLL."""
        results = {}
        for name, codes in self.eval_codes.items():
            results.update({f"{k}_{name}": v for k, v in self.nll(codes, max_images).items()})
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
    def save_model(self, directory: Union[str, Path]) -> Path:
        return self.generator.save_pretrained(directory, tokenizer_path=self.tokenizer_path,
                                              extra={"steps": self.step_count})


    def summary_fields(self) -> dict:
        return {"parameters": self.generator.num_parameters(), "generator": dataclasses.asdict(self.gen_config),
                "data": self.data_spec, "plain_codes": self.config.plain_codes}   # the NLL is over those codes
