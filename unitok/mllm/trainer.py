"""Training the unified model (`unitok.mllm.model.UnifiedModel`) on the shapes data: its configs and the trainer.

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> trainer = MLLMTrainer.from_tokenizer(tok, "data/tiny-shapes", out_dir="runs/mllm")
    >>> trainer.step()          # {'step': 1, 'loss': ..., 'text_loss': ..., 'image_loss': ..., 'lr': ...}
    >>> trainer.run()           # tqdm bar; evaluation and checkpoints on schedule
    >>> trainer.evaluate()      # caption attribute accuracy, VQA accuracy per question type, text / image NLL

Data: scenes encoded once by the frozen tokenizer and cached (`unitok.mllm.tasks.encode_scenes`); every training
sequence is built on the fly from a scene's description (`unitok.data.scene_text`: canonical captions for i2t, varied
prompts for t2i, questions for VQA) and scored by `unitok.evaluation.mllm_scores`. Held-out colour x shape pairs
never appear in training images (the split excludes them) nor in training text. Which task, which phrasing and
which prompt an item gets is a pure function of (seed, step, slot), so a resumed run sees exactly the batches it
would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..checkpoint import tokenizer_hash
from ..tokenizer.config import coerce_value, split_override
from ..data.scene_text import QUESTION_TYPES, canonical_caption, fit_prompt, make_question, t2i_prompt, text_corpus
from ..evaluation.mllm_scores import evaluate_t2i, evaluate_understanding
from .config import MLLMConfig
from .model import UnifiedModel
from .text import TextTokenizer
from .tasks import SceneSet, encode_scenes
from ..training.trainer import StepBatchSampler, TrainerBase

COMMAND = "unitok train-mllm"


# ---------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class MLLMTrainConfig:
    batch_size: int = 32
    steps: int = 4500                  # about 16 minutes on one core of a 2-core AMX CPU in bf16 (docs/mllm.md)
    lr: float = 2e-3
    betas: tuple = (0.9, 0.95)
    weight_decay: float = 0.05
    eps: float = 1e-8
    warmup_fraction: float = 0.05      # linear warm-up, then cosine to min_lr_ratio * lr (unitok.training.trainer.lr_at)
    min_lr_ratio: float = 0.05
    grad_clip: float = 1.0
    seed: int = 0
    t2i_weight: float = 1.0            # task mix: shares of each batch (normalised)
    i2t_weight: float = 1.0
    vqa_weight: float = 1.0
    text_merges: int = 400             # BPE merges of the text tokenizer
    train_images: int = 12_000         # scenes (about 12 passes over them in 4500 steps)
    eval_images: int = 64              # per eval set (test: up to two objects; heldout: held-out pairs)
    t2i_samples: int = 2               # images per "a {colour} {shape}" prompt in the final t2i evaluation
    cfg_scale: float = 3.0             # guidance for the t2i evaluation
    eval_every: int = 0                # 0: evaluate only at the end (greedy decoding is not cheap)
    checkpoint_every: int = 250
    log_every: int = 10
    compile: bool = False             # torch.compile the training forward (the trainer base applies it)
    device: str = "auto"
    amp: bool = True                   # bf16 autocast on CUDA
    cpu_bf16: str = "auto"             # CPU: "off" (fp32), "on" or "auto" (bf16 where the CPU has AMX: 1.5x faster)


MODEL_PRESETS = {
    "tiny": dict(width=128, depth=4, num_heads=4, depth_width=128, depth_layers=1, depth_heads=4),
    "small": dict(width=256, depth=6, num_heads=8, depth_width=192, depth_layers=2, depth_heads=4),
}


def apply_mllm_overrides(model: MLLMConfig, train: MLLMTrainConfig, overrides) -> tuple:
    """`key=value` overrides (a bare key, or `model.key` / `train.key`) -> new (MLLMConfig, MLLMTrainConfig)."""
    items = overrides.items() if isinstance(overrides, dict) else (split_override(o) for o in overrides or [])
    m, t = dataclasses.asdict(model), dataclasses.asdict(train)
    mtypes = {f.name: f.type for f in dataclasses.fields(MLLMConfig)}
    ttypes = {f.name: f.type for f in dataclasses.fields(MLLMTrainConfig)}
    fixed = {"grid_size", "num_codebooks", "codebook_size", "latent_dim", "tokenizer_width", "vocab_size",
             "projection", "quantizer"}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("model", "mllm", "") and name in m and name not in fixed:
            m[name] = coerce_value(key, value, mtypes[name], m[name])
        elif section in ("train", "") and name in t:
            t[name] = coerce_value(key, value, ttypes[name], t[name])
        else:
            raise ValueError(f"unknown setting {key!r}; model keys: {sorted(k for k in m if k not in fixed)}; "
                             f"train keys: {sorted(t)}")
    t["betas"] = tuple(t["betas"])
    train = MLLMTrainConfig(**t)
    weights = (train.t2i_weight, train.i2t_weight, train.vqa_weight)
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"task weights must be >= 0 with a positive sum, got t2i/i2t/vqa = {weights}")
    model = MLLMConfig(**m)
    if not model.can_generate and train.t2i_weight > 0:
        raise ValueError("image_input=continuous reads images but cannot write them: set t2i_weight=0")
    return model, train


def mllm_configs(tokenizer, preset: Optional[str] = "tiny", overrides=None, saved: Optional[dict] = None) -> tuple:
    """The (MLLMConfig, MLLMTrainConfig) a command line asks for: the named preset -- or, with preset None and
    `saved` (a run folder's config.json), the saved run -- with the `key=value` overrides applied. The vocabulary
    size comes from the text tokenizer (set when it is trained, or taken from `saved`)."""
    if preset is None and saved is not None:
        base = MLLMConfig(**saved["mllm"])
        train = MLLMTrainConfig(**{**saved["train"], "betas": tuple(saved["train"]["betas"])})
    else:
        preset = preset or "tiny"
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown unified-model preset {preset!r}; expected one of {sorted(MODEL_PRESETS)}")
        base, train = MLLMConfig.for_tokenizer(tokenizer, **MODEL_PRESETS[preset]), MLLMTrainConfig()
        if saved is not None:
            base = dataclasses.replace(base, vocab_size=saved["mllm"]["vocab_size"])
    return apply_mllm_overrides(base, train, overrides)


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class MLLMTrainer(TrainerBase):
    """Trains a UnifiedModel one step at a time; the run folder, checkpoints, schedule, `run` and the summary come
    from `unitok.training.trainer.TrainerBase`.

    Args:
        model_config, train_config: the two printable configs.
        tokenizer: the frozen UniTok; text: the TextTokenizer.
        train_set: a SceneSet; eval_sets: {"test": SceneSet, "heldout": SceneSet} for evaluate().
        out_dir: run folder (config.json, text_tokenizer.json, metrics.jsonl, eval.jsonl, checkpoint.pt, best/,
            final/, summary.json).
    """

    command = COMMAND
    progress_name = "train unified model"
    best_mode = "max"        # the mean of the test caption and VQA accuracies (`selection_score`)
    no_decay_suffixes = ("pos_embed", "row_embed", "col_embed", "next_embed")

    def __init__(self, model_config: MLLMConfig, train_config: MLLMTrainConfig, tokenizer, text: TextTokenizer,
                 train_set: SceneSet, eval_sets: Optional[Dict[str, SceneSet]] = None,
                 out_dir: Optional[Union[str, Path]] = None, resume: bool = False, overwrite: bool = False,
                 tokenizer_path: Optional[Union[str, Path]] = None, data_spec: Optional[dict] = None):
        super().__init__(train_config)
        self.model_config = model_config
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.text = text
        model = UnifiedModel(model_config, self.tokenizer, text).to(self.device)
        self.train_set, self.eval_sets = train_set, eval_sets or {}
        self.continuous = model_config.image_input == "continuous"
        if self.continuous and train_set.features is None:
            raise ValueError("image_input=continuous needs features in the training SceneSet")
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.data_spec = data_spec or {}
        self.sampler = StepBatchSampler(len(train_set), train_config.batch_size, train_config.seed, self.rank,
                                        self.world_size)
        self.start_run(model, out_dir=out_dir, resume=resume, overwrite=overwrite)

    def run_config(self) -> dict:
        return {"mllm": dataclasses.asdict(self.model_config), "train": dataclasses.asdict(self.config),
                "tokenizer": self.tokenizer_path, "data": self.data_spec}

    def run_files(self) -> Dict[str, str]:
        return {"text_tokenizer.json": json.dumps(self.text.to_json())}

    @classmethod
    def from_tokenizer(cls, tokenizer, tokenizer_path=None, preset: str = "tiny", overrides=None, out_dir=None,
                       resume: bool = False, overwrite: bool = False, progress: bool = True,
                       text: Optional[TextTokenizer] = None, saved: Optional[dict] = None) -> "MLLMTrainer":
        """Configs from a preset (or, with preset None, a `saved` run's config.json) + overrides, encoded (or cached)
        scenes, the text tokenizer (trained here unless given), a trainer."""
        model_cfg, train = mllm_configs(tokenizer, preset, overrides, saved=saved)
        digest = tokenizer_hash(tokenizer)
        feats = model_cfg.continuous_source if model_cfg.image_input == "continuous" else None
        kw = dict(features=feats, progress=progress, digest=digest, seed=train.seed)
        train_set = encode_scenes(tokenizer, "train", train.train_images, **kw)
        evals = {"test": encode_scenes(tokenizer, "test", train.eval_images, max_objects=2, **kw),
                 "heldout": encode_scenes(tokenizer, "heldout", train.eval_images, max_objects=1, **kw)}
        if text is None:
            text = TextTokenizer.train(text_corpus(train_set.records[:4000], train.seed), train.text_merges)
        model_cfg = dataclasses.replace(model_cfg, vocab_size=len(text))
        return cls(model_cfg, train, tokenizer, text, train_set, evals, out_dir=out_dir, resume=resume,
                   overwrite=overwrite, tokenizer_path=tokenizer_path,
                   data_spec={"name": "shapes", "tokenizer_sha256": digest,
                              "preset": (preset or "tiny") if saved is None else saved["data"].get("preset")})

    # ------------------------------------------------------------------ batches
    def task_counts(self, batch_size: int) -> Dict[str, int]:
        """How many items of each task a batch holds (largest remainders; fixed for the run)."""
        cfg = self.config
        w = {"t2i": cfg.t2i_weight, "i2t": cfg.i2t_weight, "vqa": cfg.vqa_weight}
        total = sum(w.values())
        raw = {k: batch_size * v / total for k, v in w.items()}
        counts = {k: int(v) for k, v in raw.items()}
        for k in sorted(raw, key=lambda k: raw[k] - counts[k], reverse=True)[:batch_size - sum(counts.values())]:
            counts[k] += 1
        return counts

    def items_for_step(self, step: int) -> tuple:
        """The training items of step `step` and their caption-dropout flags: a pure function of (seed, step)."""
        cfg = self.config
        index = self.sampler.indices_for_step(step)
        rng = random.Random(f"mllm/{cfg.seed}/{step}")
        tasks = [t for t, n in self.task_counts(len(index)).items() for _ in range(n)]
        items, drop = [], []
        for i, task in zip(index, tasks):
            rec = self.train_set.records[i]
            item = {"task": task, "image": self.train_set.image(i, self.continuous)}
            if task == "t2i":
                item["caption"] = fit_prompt(self.text, self.model_config.caption_tokens, rec,
                                             t2i_prompt(rec, rng))
            elif task == "i2t":
                item["caption"] = canonical_caption(rec)
            else:
                qa = None
                while qa is None:
                    qa = make_question(rec, rng.choice(QUESTION_TYPES), rng)
                item["question"], item["answer"] = qa
            items.append(item)
            drop.append(task == "t2i" and rng.random() < self.model_config.caption_dropout)
        return items, drop

    # ------------------------------------------------------------------ the step
    def batch_for_step(self, step: int) -> dict:
        return self.model.build_batch(*self.items_for_step(step))

    def loss_terms(self, batch: dict) -> Dict[str, torch.Tensor]:
        with self.autocast():
            out = self.train_model(batch)
        return {"loss": out.loss, "text_loss": out.text_loss, "image_loss": out.image_loss}

    def step_metrics(self, batch: dict, terms: Dict[str, float], seconds: float) -> dict:
        return {"tokens": int(batch["tokens"].numel())}

    def progress_postfix(self, metrics: dict) -> dict:
        return {"text": f"{metrics['text_loss']:.3f}", "image": f"{metrics['image_loss']:.3f}"}

    # ------------------------------------------------------------------ evaluation
    def evaluation(self, max_images: Optional[int] = None, t2i: bool = False) -> dict:
        """Understanding on every eval set (caption attribute accuracy, VQA accuracy per type, text and image NLL);
        with t2i, also prompt accuracy of generated images. best/ follows the mean test accuracy."""
        results = {"train_seconds": round(self.clock.train_seconds, 2),
                   "scaled_seconds": round(self.clock.train_scaled_seconds, 2)}
        for name, sset in self.eval_sets.items():
            r = evaluate_understanding(self.model, sset, max_images=max_images)
            results.update({f"{k}_{name}": v for k, v in r.items()})
        if t2i and self.model_config.can_generate:
            results.update(evaluate_t2i(self.model, num=self.config.t2i_samples, cfg_scale=self.config.cfg_scale))
        return results

    def selection_score(self, results: dict) -> Optional[float]:
        return (results.get("caption_mean_acc_test", 0.0) + results.get("vqa_acc_test", 0.0)) / 2

    # ------------------------------------------------------------------ saving
    def save_model(self, directory: Union[str, Path]) -> Path:
        return self.model.save_pretrained(directory, tokenizer_path=self.tokenizer_path,
                                          extra={"steps": self.step_count})

    def summary_fields(self) -> dict:
        return {"parameters": self.model.num_parameters(), "mllm": dataclasses.asdict(self.model_config),
                "data": self.data_spec}
