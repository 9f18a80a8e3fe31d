"""Tasks, training and measurement of the unified model (`unitok.mllm.model.UnifiedModel`) on the shapes data.

    >>> tok = UniTok.from_pretrained("data/tiny-shapes")
    >>> trainer = MLLMTrainer.from_tokenizer(tok, "data/tiny-shapes", out_dir="runs/mllm")
    >>> trainer.step()          # {'step': 1, 'loss': ..., 'text_loss': ..., 'image_loss': ..., 'lr': ...}
    >>> trainer.run()           # tqdm bar; evaluation and checkpoints on schedule
    >>> trainer.evaluate()      # caption attribute accuracy, VQA accuracy per question type, text / image NLL

Data: images of a split are encoded once by the frozen tokenizer and cached (codes, and the continuous features
when the model reads those) with their scene descriptions under `unitok.data.datasets.default_cache_dir()/mllm/`; the file
name carries the tokenizer's weight hash. Every training sequence is then built on the fly from a scene:

- i2t targets are *canonical* captions that always name size, colour, shape and position of every object and the
  background ("a large red star at the top left, on a black background"; "two shapes: a small red star at the
  top left and a small blue circle at the right, on black"), so a generated caption can be scored attribute by
  attribute (`parse_caption`);
- t2i prompts are drawn from the dataset's own varied captions, the canonical caption and short "a red star"
  phrases;
- questions (`QUESTION_TYPES`): colour, shape, position, size, background, count, and yes/no ("is there a red
  star?", answers balanced, negatives differ from a present object in colour or in shape), several phrasings each.

Held-out colour x shape pairs never appear in training images (the split excludes them) nor in training text
(yes/no negatives skip them). Which task, which phrasing and which prompt an item gets is a pure function of
(seed, step, slot), so a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn

from ..training.checkpoint import atomic_write, load_state_dict_checked, read_torch
from ..tokenizer.config import _coerce, _split_override
from ..data.datasets import ShapesDataset, default_cache_dir
from ..generator.model import tokenizer_hash
from .model import MLLMConfig, TextTokenizer, UnifiedModel
from ..training.runs import RunLock, atomic_write_text, prepare_run_folder
from ..training.machine import pick_device, training_autocast, uses_bf16
from ..training.tokenizer_trainer import NonFiniteLossError, StepBatchSampler, lr_at, seed_everything

COMMAND = "unitok train-mllm"
DS = ShapesDataset
HELDOUT = set(DS.heldout_pairs)
TRAIN_PAIRS = [(c, s) for c in DS.COLOURS for s in DS.SHAPES if (c, s) not in HELDOUT]
QUESTION_TYPES = ("colour", "shape", "position", "size", "background", "count", "yesno")
REFERENCE_GFLOPS = 192.0   # training times are also reported scaled to a machine with this fp32 matmul peak


def matmul_gflops(size: int = 1024, repeats: int = 3) -> float:
    """This machine's fp32 matmul throughput right now (best of `repeats` size x size products), in GFLOP/s.
    Measured during training, so a time scaled by it tracks how much of the CPU the run actually had."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


# ---------------------------------------------------------------------------------------------------------------
# scenes -> text
# ---------------------------------------------------------------------------------------------------------------
def scene_record(scene: dict) -> dict:
    """`ShapesDataset.scene` output -> the compact record kept in the cache: objects [(colour, shape, size,
    position)], background, caption."""
    return {"objects": [(o["colour"], o["shape"], o["size"], o["position"]) for o in scene["objects"]],
            "background": scene["background"], "caption": scene["caption"]}


def _obj_phrase(obj, size: bool = True) -> str:
    colour, shape, sz, position = obj
    return f"a {sz + ' ' if size else ''}{colour} {shape} at the {position}"


def canonical_caption(rec: dict) -> str:
    """The i2t target: every attribute of every object, and the background."""
    objs, bg = rec["objects"], rec["background"]
    if len(objs) == 1:
        return f"{_obj_phrase(objs[0])}, on a {bg} background"
    return f"two shapes: {_obj_phrase(objs[0])} and {_obj_phrase(objs[1])}, on {bg}"


def t2i_prompt(rec: dict, rng: random.Random) -> str:
    """A training prompt for text-to-image: the dataset's caption, the canonical one, or a short phrase."""
    objs = rec["objects"]
    r = rng.random()
    if r < 0.4:
        return rec["caption"]
    if r < 0.6 or len(objs) > 1:
        return canonical_caption(rec)
    colour, shape, size, _ = objs[0]
    return rng.choice([f"a {colour} {shape}", f"a {size} {colour} {shape}", f"{colour} {shape}"])


_TEMPLATES = {
    "colour": ["what colour is the shape?", "what color is the shape?", "what colour is it?",
               "which colour is the object?", "what is the colour of the shape?"],
    "shape": ["what shape is it?", "what shape is the object?", "which shape is this?", "what is the shape?",
              "what kind of shape is shown?"],
    "position": ["where is the shape?", "where is it?", "where is the object?", "where is the shape located?",
                 "in which part of the picture is the shape?"],
    "size": ["how big is the shape?", "is the shape small or large?", "what size is it?",
             "how large is the object?"],
    "background": ["what colour is the background?", "what is the background?", "which background is it?",
                   "what color is the background?"],
    "count": ["how many shapes are there?", "how many objects are in the picture?", "how many shapes?",
              "how many things are there?"],
    "yesno": ["is there a {}?", "is there a {} in the picture?", "do you see a {}?", "can you see a {}?"],
}
_NAMED = {  # two-object scenes name the object the question is about
    "colour": ["what colour is the {shape}?", "what color is the {shape}?"],
    "shape": ["what shape is the {colour} one?", "which shape is {colour}?"],
    "position": ["where is the {pair}?", "where is the {pair} located?"],
    "size": ["how big is the {pair}?", "what size is the {pair}?"],
}


def make_question(rec: dict, qtype: str, rng: Optional[random.Random] = None, answer_yes: Optional[bool] = None,
                  heldout_ok: bool = False) -> Optional[tuple]:
    """(question, answer) of type `qtype` about a scene, or None when it would be ambiguous.

    rng None: the first phrasing (evaluation). answer_yes: for "yesno", which answer to ask for (default: random).
    heldout_ok: yes/no negatives may name held-out pairs (never in training).
    """
    pick = (lambda xs: xs[0]) if rng is None else rng.choice
    objs, bg = rec["objects"], rec["background"]
    first = objs[0]
    colour, shape, size, position = first
    if qtype == "background":
        return pick(_TEMPLATES["background"]), bg
    if qtype == "count":
        return pick(_TEMPLATES["count"]), "one" if len(objs) == 1 else "two"
    if qtype == "yesno":
        yes = (rng.random() < 0.5 if rng is not None else True) if answer_yes is None else answer_yes
        present = {(o[0], o[1]) for o in objs}
        if yes:
            c, s = pick(objs)[:2]
        else:
            base = pick(objs)
            choices = ([(c, base[1]) for c in DS.COLOURS] + [(base[0], s) for s in DS.SHAPES])
            choices = [p for p in choices if p not in present and (heldout_ok or p not in HELDOUT)]
            if not choices:
                return None
            c, s = pick(sorted(choices))
        return pick(_TEMPLATES["yesno"]).format(f"{c} {s}"), "yes" if yes else "no"
    answers = {"colour": colour, "shape": shape, "position": position, "size": size}
    if qtype not in answers:
        raise ValueError(f"question type must be one of {QUESTION_TYPES}, got {qtype!r}")
    if len(objs) == 1:
        return pick(_TEMPLATES[qtype]), answers[qtype]
    other = objs[1]
    if qtype == "colour" and other[1] == shape or qtype == "shape" and other[0] == colour:
        return None   # "the star" / "the red one" would not say which object
    return pick(_NAMED[qtype]).format(shape=shape, colour=colour, pair=f"{colour} {shape}"), answers[qtype]


def eval_questions(rec: dict, heldout_ok: bool = True) -> List[tuple]:
    """Every question type once (yes/no twice: one yes, one no) in its first phrasing -> [(type, q, a)]."""
    out = []
    for qtype in QUESTION_TYPES:
        for yes in ((True, False) if qtype == "yesno" else (None,)):
            qa = make_question(rec, qtype, None, answer_yes=yes, heldout_ok=heldout_ok)
            if qa is not None:
                out.append((qtype, *qa))
    return out


def text_corpus(records: Sequence[dict], seed: int = 0) -> List[str]:
    """What the text tokenizer is trained on: captions (dataset and canonical), prompts, questions, answers."""
    rng = random.Random(f"corpus/{seed}")
    out = []
    for rec in records:
        out += [rec["caption"], canonical_caption(rec), t2i_prompt(rec, rng)]
        for qtype in QUESTION_TYPES:
            qa = make_question(rec, qtype, rng)
            if qa:
                out += list(qa)
    for templates in list(_TEMPLATES.values()) + list(_NAMED.values()):
        out += templates
    return out


def fit_prompt(text: TextTokenizer, limit: int, rec: dict, prompt: str) -> str:
    """`prompt` if it fits in `limit` text tokens, else the canonical caption, else "colour shape" (a few of the
    dataset's two-object captions are longer than the t2i prompt slots)."""
    for candidate in (prompt, canonical_caption(rec)):
        if len(text.encode(candidate)) <= limit:
            return candidate
    return " ".join(rec["objects"][0][:2])


def parse_caption(text: str) -> dict:
    """A generated caption -> {"colour", "shape", "size", "position", "count"} of the first-mentioned object
    (None for what it does not say). Understands the canonical captions and the dataset's own phrasings."""
    t = " " + TextTokenizer.normalize(text).replace(",", " ,") + " "
    count = 2 if t.startswith(" two ") or " and a" in t else 1
    first = t.split(" and ")[0].split(" , on ")[0].split(" over ")[0].split(" against ")[0]
    first = first.replace("two shapes:", " ") + " "

    def find(words):
        hits = [(first.find(f" {w} "), w) for w in words if f" {w} " in first]
        return min(hits)[1] if hits else None

    position = None
    for name in sorted(DS.POSITIONS, key=len, reverse=True):   # "top left" before "top"
        phrases = [f" at the {name} ", f" {DS.POSITION_PHRASES[name]} "]
        if any(p in first for p in phrases):
            position = name
            break
    return {"colour": find(DS.COLOURS), "shape": find(DS.SHAPES), "size": find(DS.SIZES), "position": position,
            "count": count}


# ---------------------------------------------------------------------------------------------------------------
# encoded scenes, cached
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SceneSet:
    """Encoded images of one split: codes (n, N, k) int16, optional features (n, N, F) float16, records."""
    codes: torch.Tensor
    records: List[dict]
    features: Optional[torch.Tensor] = None
    split: str = "train"

    def __len__(self) -> int:
        return len(self.records)

    def image(self, i: int, continuous: bool) -> torch.Tensor:
        return self.features[i].float() if continuous else self.codes[i].long()

    def images(self, index, continuous: bool) -> torch.Tensor:
        index = torch.as_tensor(index, dtype=torch.long)
        return self.features[index].float() if continuous else self.codes[index].long()


@torch.no_grad()
def encode_scenes(tokenizer, split: str = "train", num_images: int = 20_000, seed: int = 0,
                  max_objects: int = 2, features: Optional[str] = None, batch_size: int = 256,
                  cache_dir: Optional[Union[str, Path]] = None, progress: bool = True,
                  digest: Optional[str] = None) -> SceneSet:
    """Render `num_images` shapes scenes of a split, encode them with the frozen tokenizer (codes, and features
    "latent" / "encoder" when asked), or load them from the cache."""
    from tqdm.auto import tqdm

    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    if features not in (None, "latent", "encoder"):
        raise ValueError(f"features must be None, 'latent' or 'encoder', got {features!r}")
    digest = digest or tokenizer_hash(tokenizer)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    size = tokenizer.config.image_size
    path = (cache / "mllm" / f"shapes-{split}-{num_images}-seed{seed}-obj{max_objects}-{features or 'codes'}-"
            f"{size}px-{digest[:16]}.pt")
    if path.is_file():
        state = read_torch(path, what="a cached scene file")
        if state.get("tokenizer_sha256") == digest:
            return SceneSet(state["codes"], state["records"], state.get("features"), split)
    ds = ShapesDataset(size, split, length=num_images, seed=seed, max_objects=max_objects)
    device = tokenizer.logit_scale.device
    tokenizer.eval()
    codes, feats, records = [], [], []
    for start in tqdm(range(0, num_images, batch_size), desc=f"encoding shapes/{split}", disable=not progress):
        idx = range(start, min(num_images, start + batch_size))
        scenes = [ds.scene(i) for i in idx]
        images = torch.stack([torch.from_numpy(ds.render(s)) for s in scenes]).to(device)
        records += [scene_record(s) for s in scenes]
        codes.append(tokenizer.encode(images).flatten(1, 2).to("cpu", torch.int16))
        if features == "latent":
            feats.append(tokenizer.encode_latent(images).to("cpu", torch.float16))
        elif features == "encoder":
            feats.append(tokenizer.encoder(images).to("cpu", torch.float16))
    state = {"codes": torch.cat(codes), "records": records, "tokenizer_sha256": digest,
             "features": torch.cat(feats) if feats else None}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(state, tmp))
    return SceneSet(state["codes"], records, state["features"], split)


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
    warmup_fraction: float = 0.05      # linear warm-up, then cosine to min_lr_ratio * lr (unitok.training.tokenizer_trainer.lr_at)
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
    device: str = "auto"
    amp: bool = True                   # bf16 autocast on CUDA
    cpu_bf16: str = "auto"             # CPU: "off" (fp32), "on" or "auto" (bf16 where the CPU has AMX: 1.5x faster)


MODEL_PRESETS = {
    "tiny": dict(width=128, depth=4, num_heads=4, depth_width=128, depth_layers=1, depth_heads=4),
    "small": dict(width=256, depth=6, num_heads=8, depth_width=192, depth_layers=2, depth_heads=4),
}


def apply_mllm_overrides(model: MLLMConfig, train: MLLMTrainConfig, overrides) -> tuple:
    """`key=value` overrides (a bare key, or `model.key` / `train.key`) -> new (MLLMConfig, MLLMTrainConfig)."""
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides or [])
    m, t = dataclasses.asdict(model), dataclasses.asdict(train)
    mtypes = {f.name: f.type for f in dataclasses.fields(MLLMConfig)}
    ttypes = {f.name: f.type for f in dataclasses.fields(MLLMTrainConfig)}
    fixed = {"grid_size", "num_codebooks", "codebook_size", "latent_dim", "tokenizer_width", "vocab_size",
             "projection"}
    for key, value in items:
        section, _, name = key.rpartition(".")
        if section in ("model", "mllm", "") and name in m and name not in fixed:
            m[name] = _coerce(key, value, mtypes[name], m[name])
        elif section in ("train", "") and name in t:
            t[name] = _coerce(key, value, ttypes[name], t[name])
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


# ---------------------------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------------------------
class MLLMTrainer:
    """Trains a UnifiedModel one step at a time (the conventions of `unitok.training.tokenizer_trainer.Trainer`: step() / run() /
    history / callbacks, exact resume, atomic checkpoints, a NaN guard, one run per folder).

    Args:
        model_config, train_config: the two printable configs.
        tokenizer: the frozen UniTok; text: the TextTokenizer.
        train_set: a SceneSet; eval_sets: {"test": SceneSet, "heldout": SceneSet} for evaluate().
        out_dir: run folder (config.json, metrics.jsonl, eval.jsonl, checkpoint.pt, best/, final/, summary.json).
    """

    def __init__(self, model_config: MLLMConfig, train_config: MLLMTrainConfig, tokenizer, text: TextTokenizer,
                 train_set: SceneSet, eval_sets: Optional[Dict[str, SceneSet]] = None,
                 out_dir: Optional[Union[str, Path]] = None, resume: bool = False, overwrite: bool = False,
                 tokenizer_path: Optional[Union[str, Path]] = None, data_spec: Optional[dict] = None):
        self.model_config, self.config = model_config, train_config
        self.device = pick_device(train_config.device)
        self.bf16 = uses_bf16(self.device, train_config.amp, train_config.cpu_bf16)   # checks the choice early
        seed_everything(train_config.seed)
        self.tokenizer = tokenizer.to(self.device).eval().requires_grad_(False)
        self.text = text
        self.model = UnifiedModel(model_config, self.tokenizer, text).to(self.device)
        self.train_set, self.eval_sets = train_set, eval_sets or {}
        self.continuous = model_config.image_input == "continuous"
        if self.continuous and train_set.features is None:
            raise ValueError("image_input=continuous needs features in the training SceneSet")
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.data_spec = data_spec or {}
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self._lock = None
        if self.out_dir is not None:
            prepare_run_folder(self.out_dir, resume=resume, overwrite=overwrite, command=COMMAND)
            self._lock = RunLock(self.out_dir, COMMAND).acquire()
            weakref.finalize(self, self._lock.release)
        self.optimizer = self._build_optimizer()
        self.sampler = StepBatchSampler(len(train_set), train_config.batch_size, train_config.seed)
        self.step_count, self.train_seconds = 0, 0.0
        self.scaled_seconds, self._gflops = 0.0, None   # train time scaled to REFERENCE_GFLOPS (see matmul_gflops)
        self.history: List[dict] = []
        self.eval_history: List[dict] = []
        self.best_score = -math.inf
        self.callbacks: Dict[str, List[Callable]] = {"step": [], "eval": []}
        if resume and self.out_dir is not None and (self.out_dir / "checkpoint.pt").exists():
            self.load_checkpoint(self.out_dir / "checkpoint.pt")
        if self.out_dir is not None:
            atomic_write_text(self.out_dir / "config.json", json.dumps(self.run_config(), indent=2))
            atomic_write_text(self.out_dir / "text_tokenizer.json", json.dumps(text.to_json()))

    def run_config(self) -> dict:
        return {"mllm": dataclasses.asdict(self.model_config), "train": dataclasses.asdict(self.config),
                "tokenizer": self.tokenizer_path, "data": self.data_spec}

    @classmethod
    def from_tokenizer(cls, tokenizer, tokenizer_path=None, preset: str = "tiny", overrides=None, out_dir=None,
                       resume: bool = False, overwrite: bool = False, progress: bool = True,
                       text: Optional[TextTokenizer] = None) -> "MLLMTrainer":
        """Configs from a preset + overrides, encoded (or cached) scenes, the text tokenizer, a trainer."""
        if preset not in MODEL_PRESETS:
            raise ValueError(f"unknown unified-model preset {preset!r}; expected one of {sorted(MODEL_PRESETS)}")
        base = MLLMConfig.for_tokenizer(tokenizer, **MODEL_PRESETS[preset])
        model_cfg, train = apply_mllm_overrides(base, MLLMTrainConfig(), overrides)
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
                   data_spec={"name": "shapes", "tokenizer_sha256": digest, "preset": preset})

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _build_optimizer(self) -> torch.optim.Optimizer:
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            vector_like = p.ndim < 2 or name.endswith(("pos_embed", "row_embed", "col_embed", "next_embed"))
            (no_decay if vector_like else decay).append(p)
        cfg = self.config
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=tuple(cfg.betas),
                                 eps=cfg.eps)

    def add_callback(self, event: str, fn: Callable) -> None:
        """event "step": fn(trainer, metrics) after every step; "eval": fn(trainer, results) after evaluate()."""
        if event not in self.callbacks:
            raise ValueError(f"event must be one of {sorted(self.callbacks)}, got {event!r}")
        self.callbacks[event].append(fn)

    def remove_callback(self, event: str, fn: Callable) -> None:
        if fn in self.callbacks.get(event, []):
            self.callbacks[event].remove(fn)

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

    def _autocast(self):
        return training_autocast(self.device, self.config.amp, self.config.cpu_bf16)

    # ------------------------------------------------------------------ training
    def step(self) -> dict:
        """One optimisation step on the batch for this step number. Returns its metrics (also in `history`)."""
        if self._gflops is None or self.step_count % 25 == 0:
            self._gflops = matmul_gflops() if self.device.type == "cpu" else None
        start = time.perf_counter()
        items, drop = self.items_for_step(self.step_count)
        batch = self.model.build_batch(items, drop)
        lr = lr_at(self.step_count, self.config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        with self._autocast():
            out = self.model(batch)
        loss = float(out.loss.detach())
        if not math.isfinite(loss):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(f"the unified model's loss became {loss} at step {self.step_count + 1}; "
                                     f"training stopped before the update")
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step_count += 1
        seconds = time.perf_counter() - start
        self.train_seconds += seconds
        if self._gflops:
            self.scaled_seconds += seconds * self._gflops / REFERENCE_GFLOPS
        metrics = {"step": self.step_count, "lr": lr, "loss": loss, "text_loss": float(out.text_loss.detach()),
                   "image_loss": float(out.image_loss.detach()), "grad_norm": float(grad_norm), "seconds": seconds,
                   "matmul_gflops": self._gflops, "tokens": int(batch["tokens"].numel())}
        self.history.append(metrics)
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
        for fn in self.callbacks["step"]:
            fn(self, metrics)
        return metrics

    def run(self, steps: Optional[int] = None, progress: bool = True) -> List[dict]:
        """Train until `steps` more steps are done (default: up to config.steps), evaluating and checkpointing on
        schedule. Returns the history."""
        from tqdm.auto import tqdm

        target = self.config.steps if steps is None else self.step_count + steps
        bar = tqdm(total=max(0, target - self.step_count), disable=not progress, desc="train unified model")
        try:
            while self.step_count < target:
                m = self.step()
                bar.update(1)
                if self.step_count % self.config.log_every == 0:
                    bar.set_postfix(text=f"{m['text_loss']:.3f}", image=f"{m['image_loss']:.3f}")
                if self.config.eval_every and self.step_count % self.config.eval_every == 0:
                    self.evaluate()
                if self.config.checkpoint_every and self.step_count % self.config.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        return self.history

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, max_images: Optional[int] = None, t2i: bool = False) -> dict:
        """Understanding on every eval set (caption attribute accuracy, VQA accuracy per type, text and image NLL);
        with t2i, also prompt accuracy of generated images. Saves best/ by the mean test accuracy."""
        results = {"step": self.step_count, "train_seconds": round(self.train_seconds, 2),
                   "scaled_seconds": round(self.scaled_seconds, 2)}
        for name, sset in self.eval_sets.items():
            r = evaluate_understanding(self.model, sset, max_images=max_images)
            results.update({f"{k}_{name}": v for k, v in r.items()})
        if t2i and self.model_config.can_generate:
            results.update(evaluate_t2i(self.model, num=self.config.t2i_samples, cfg_scale=self.config.cfg_scale))
        self.eval_history.append(results)
        key = "caption_mean_acc_test"
        score = (results.get(key, 0.0) + results.get("vqa_acc_test", 0.0)) / 2
        if self.out_dir is not None:
            with open(self.out_dir / "eval.jsonl", "a") as f:
                f.write(json.dumps(results) + "\n")
            if score > self.best_score:
                self.best_score = score
                self.save_model(self.out_dir / "best")
        for fn in self.callbacks["eval"]:
            fn(self, results)
        return results

    # ------------------------------------------------------------------ saving
    def save_model(self, directory: Union[str, Path]) -> Path:
        return self.model.save_pretrained(directory, tokenizer_path=self.tokenizer_path,
                                          extra={"steps": self.step_count})

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step_count, "train_seconds": self.train_seconds, "best_score": self.best_score,
                "scaled_seconds": self.scaled_seconds,
                "history": self.history, "eval_history": self.eval_history, "torch_rng": torch.get_rng_state()}

    def save_checkpoint(self) -> Optional[Path]:
        """out_dir/checkpoint.pt, atomically (a crash mid-save keeps the previous one)."""
        if self.out_dir is None:
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
        state = read_torch(path, what="a checkpoint.pt written by MLLMTrainer.save_checkpoint")
        load_state_dict_checked(self.model, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count, self.train_seconds = int(state["step"]), float(state["train_seconds"])
        self.best_score = float(state["best_score"])
        self.scaled_seconds = float(state.get("scaled_seconds", 0.0))
        self.history, self.eval_history = list(state["history"]), list(state["eval_history"])
        torch.set_rng_state(state["torch_rng"])
        if self.out_dir is not None:  # drop log lines written after the checkpoint (a crash)
            for name, rows in (("metrics.jsonl", self.history), ("eval.jsonl", self.eval_history)):
                with open(self.out_dir / name, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows)

    def write_summary(self, extra: Optional[dict] = None) -> dict:
        """summary.json (steps, train time, the last evaluation, `extra`) + final weights in out_dir/final/."""
        summary = {"steps": self.step_count, "train_seconds": round(self.train_seconds, 2),
                   "precision": "bf16" if self.bf16 else "fp32",
                   f"train_seconds_at_{REFERENCE_GFLOPS:.0f}_gflops": round(self.scaled_seconds, 2),
                   "parameters": self.model.num_parameters(), "mllm": dataclasses.asdict(self.model_config),
                   "data": self.data_spec}
        summary.update(self.eval_history[-1] if self.eval_history else {})
        summary.update(extra or {})
        if self.out_dir is not None:
            self.save_model(self.out_dir / "final")
            atomic_write_text(self.out_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
_LABEL_VALUES = {"colour": 0, "shape": 1, "size": 2, "position": 3}


@torch.no_grad()
def evaluate_understanding(model: UnifiedModel, sset: SceneSet, max_images: Optional[int] = None,
                           batch_size: int = 128) -> dict:
    """Greedy captions and answers on a SceneSet, scored against its scene labels.

    caption_{colour,shape,size,position,count}_acc: the attribute parsed from the generated caption equals the
    first object's (count: one or two objects); caption_mean_acc their mean. vqa_acc (all questions) and
    vqa_{type}_acc per question type. text_nll: teacher-forced nats per target text token (captions and answers);
    image_nll: nats per sub-code of the images given their canonical caption (models that write images).
    """
    continuous = model.config.image_input == "continuous"
    n = min(len(sset), max_images or len(sset))
    recs = sset.records[:n]
    hits = {k: 0 for k in ("colour", "shape", "size", "position", "count")}
    vqa_hits, vqa_total = {}, {}
    text_nll = text_tok = image_nll = image_sub = 0.0
    was_training = model.training
    model.eval()
    heldout_ok = sset.split == "heldout"
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        images = sset.images(idx, continuous)
        for i, cap in zip(idx, model.caption(images)):
            got, objs = parse_caption(cap), recs[i]["objects"]
            truth = objs[0]
            for key, j in _LABEL_VALUES.items():
                hits[key] += got[key] == truth[j]
            hits["count"] += got["count"] == len(objs)
        qs = [(i, *q) for i in idx for q in eval_questions(recs[i], heldout_ok)]
        for q0 in range(0, len(qs), batch_size):
            chunk = qs[q0:q0 + batch_size]
            img = sset.images([c[0] for c in chunk], continuous)
            answers = model.answer(img, [c[2] for c in chunk])
            for (_, qtype, _, truth), ans in zip(chunk, answers):
                vqa_total[qtype] = vqa_total.get(qtype, 0) + 1
                vqa_hits[qtype] = vqa_hits.get(qtype, 0) + (TextTokenizer.normalize(ans) == truth)
        # teacher-forced NLL: captions (i2t), one answer per image (vqa), images (t2i)
        items = [{"task": "i2t", "image": sset.image(i, continuous), "caption": canonical_caption(recs[i])}
                 for i in idx]
        items += [{"task": "vqa", "image": sset.image(i, continuous), "question": q, "answer": a}
                  for i in idx for (_, q, a) in eval_questions(recs[i], heldout_ok)[:1]]
        for part in (items[:len(idx)], items[len(idx):]):    # one task per pass: a per-token mean
            out = model(model.build_batch(part))
            text_nll += float(out.text_loss) * out.text_tokens
            text_tok += out.text_tokens
        if model.config.can_generate:
            items = [{"task": "t2i", "image": sset.image(i, continuous),
                      "caption": fit_prompt(model.text, model.config.caption_tokens, recs[i],
                                            canonical_caption(recs[i]))} for i in idx]
            out = model(model.build_batch(items))
            image_nll += float(out.image_loss) * out.image_subcodes
            image_sub += out.image_subcodes
    model.train(was_training)
    res = {f"caption_{k}_acc": v / n for k, v in hits.items()}
    res["caption_mean_acc"] = sum(res.values()) / len(hits)
    res.update({f"vqa_{k}_acc": vqa_hits[k] / vqa_total[k] for k in vqa_total})
    res["vqa_acc"] = sum(vqa_hits.values()) / max(1, sum(vqa_total.values()))
    res["text_nll"] = text_nll / max(1, text_tok)
    if image_sub:
        res["image_nll"] = image_nll / image_sub
    res["images"] = n
    return res


@torch.no_grad()
def evaluate_t2i(model: UnifiedModel, num: int = 4, cfg_scale: float = 3.0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, classifier=None) -> dict:
    """Prompt accuracy of generated images ("a {colour} {shape}" for the 53 seen and the 11 held-out pairs, `num`
    each), read by the project's shape classifier (`unitok.generator.trainer.evaluate_samples`):
    t2i_colour_acc, t2i_shape_acc, t2i_both_acc (and `_heldout`)."""
    from ..generator.trainer import evaluate_samples

    res = evaluate_samples(model, num=num, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                           seed=seed, classifier=classifier, fid=False, heldout=True)
    out = {}
    for key, value in res.items():
        if key.startswith("prompt_"):
            out["t2i_" + key[len("prompt_"):]] = value
    out["t2i_sampling"] = res["sampling"]
    out["t2i_distinct_fraction"] = res.get("distinct_fraction")
    return out
