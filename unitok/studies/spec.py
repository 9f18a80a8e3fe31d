"""The words every study is written in: a `Setting` (one arm), a `Study` (a question and its arms), a `Scale` (how
large every run is), a `Task` (one study x setting x seed cell of the plan) and a run's spec and key.

    >>> setting = Setting("k=1", {"num_codebooks": 1})
    >>> spec = tokenizer_spec(Scale(steps=20), setting, seed=0)   # {"kind": "tokenizer", "model": ..., "train": ...}
    >>> spec_hash(spec)                                           # '3f2a...' (12 hex digits): the run folder's name

A run is named by a hash of everything that determines it (`spec_hash`), so two studies that ask for the same run
(the default tokenizer is an arm of several of them) share one folder, and a finished run is found again by its
key. The catalogue of studies is `unitok.studies.plan`; the roadmap study is `unitok.studies.roadmap`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

__all__ = ["Setting", "Study", "Scale", "Task", "ABLATION_OVERRIDES", "spec_hash", "resolve_overrides",
           "tokenizer_spec", "read_json"]


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
    kind: str = "tokenizer"    # "tokenizer", "generator" or "mllm" (the roadmap's unified models)
    # models trained on each tokenizer setting's codes as well ("generator", "mllm"): their records join the
    # tokenizer's under the same study, setting and seed (`unitok.studies.plan.consumer_specs`)
    consumers: tuple = ()

    def setting(self, name: str) -> Setting:
        for s in self.settings:
            if s.name == name:
                return s
        raise ValueError(f"study {self.name!r} has no setting {name!r}; expected one of "
                         f"{[s.name for s in self.settings]}")


# Model fields newer than the bundled studies, with the values those studies ran at: left out of a run's spec at these
# values, so that the bundled results keep their keys (`from_dict` fills them in when the run is loaded).
NEWER_MODEL_FIELDS = {"quantizer": "mcq", "fsq_levels": []}

# Half the depth of `tiny`: at 32 px and a few hundred steps, steps buy more than depth (and the budget is fixed).
ABLATION_OVERRIDES = ("encoder_depth=2", "decoder_depth=2")


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


def spec_hash(spec: dict) -> str:
    """A run's key: the first 12 hex digits of the SHA-256 of its spec as sorted JSON (the run folder's name)."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve_overrides(overrides: dict, model_config) -> dict:
    """A setting's overrides with every callable value replaced by its value for `model_config`."""
    return {k: (v(model_config) if callable(v) else v) for k, v in overrides.items()}


def tokenizer_spec(scale: Scale, setting: Setting, seed: int) -> dict:
    """The full spec of one tokenizer run: model and train config (dicts), data, CLIP pre-training."""
    from ..tokenizer.config import apply_overrides, to_dict

    base = scale.base_preset()
    preset = apply_overrides(base, {**resolve_overrides(setting.overrides, base.model), "train.seed": seed})
    train = to_dict(preset.train)
    if train.get("cpu_bf16") == "off":   # a field newer than the bundled studies: at "off" their run keys stay valid
        del train["cpu_bf16"]
    model = to_dict(preset.model)
    for key, value in NEWER_MODEL_FIELDS.items():   # the same for the quantizer's fields, at MCQ
        if key in model and json.dumps(model[key]) == json.dumps(value):   # (a tuple and a list alike)
            del model[key]
    spec = {"kind": "tokenizer", "model": model, "train": train,
            "data": {"name": scale.data, "path": None, "eval_images": scale.eval_images, "seed": 0},
            "fid": scale.fid}
    if setting.clip_init:
        spec["clip_pretrain"] = {"steps": scale.pretrain_steps or scale.steps}
    return spec


def read_json(path: Path) -> Optional[dict]:
    """A JSON file a study wrote (a run's result.json, the scale file), or None when it is missing or damaged: a
    run without a readable result.json is not finished."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def trained_tokenizer(out: Path, spec: dict) -> tuple:
    """A consumer task's tokenizer: the best weights of its tokenizer run (trained first by the runner), loaded on
    the run's device -> (folder, device, UniTok). A missing run is a one-line error."""
    from ..tokenizer.model import UniTok
    from ..training.machine import pick_device

    folder = out / "runs" / spec["tokenizer_key"] / "best"
    if not (folder / "model.safetensors").is_file():
        raise ValueError(f"the tokenizer run {folder.parent} has no weights; expected it to be trained first")
    device = pick_device(spec["tokenizer"]["train"]["device"])
    return folder, device, UniTok.from_pretrained(folder, map_location=str(device))
