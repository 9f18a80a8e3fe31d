"""The paper's ablations as studies (lists of config overrides), and the plan: every (study, setting, seed) run.

    >>> tasks = plan("codebooks,projection", seeds=3, scale=Scale())   # Task(study, setting, seed, spec, key), ...
    >>> parse_studies("all")                                          # ['codebooks', 'projection', ...]

Studies (`STUDIES`): each asks one of the paper's questions at a scale a laptop CPU can afford.

- `codebooks`   k in {1, 2, 4, 8} sub-codebooks at an equal number of code vectors (k x K constant) and an equal
                latent size (k = 1 is one big codebook): does splitting the latent raise reconstruction *and*
                understanding at the same cost?
- `projection`  the attention projection around the quantizer vs a plain linear one.
- `supervision` reconstruction only (clip_weight = 0) / contrastive only (l1 = l2 = 0; the image feature still
                comes from the *quantized* tokens, so the quantizer and its VQ loss stay) / both (the default).
- `init`        the image encoder and text tower first trained as a continuous CLIP on the same data (a short
                contrastive run, `unitok.studies.clip_pretrain`), then used to initialise the tokenizer, vs from
                scratch.
- `generation`  an autoregressive generator (`unitok.generator.model`) trained on the codes of the k = 1 and the k = 8
                tokenizer: held-out NLL and whether generated images show what the prompt asked for.
- `roadmap`     the unified model on six tokenizer variants (`unitok.studies.roadmap`); asked for by name, not part
                of "all".
- `quantizers`  MCQ against residual VQ, FSQ, LFQ and SimVQ (`unitok.tokenizer.quantizers`) at equal bits per token,
                and what a generator and the unified model make of each one's codes (the consumers: one generator and
                one unified-model run per tokenizer run); asked for by name, not part of "all".

Every run is named by a hash of everything that determines it (`unitok.studies.spec.spec_hash`): a setting that two
studies share (the default tokenizer is `k=8` in `codebooks`, `attn` in `projection`, `joint` in `supervision`,
`scratch` in `init`) is one run. Seeds: a seed sets the weight initialisation and the order of the training images;
the evaluation images are the same for every run (data seed 0), so settings are compared on identical test sets.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Union

from .roadmap import ROADMAP_STUDY, mllm_spec
from .spec import Scale, Setting, Study, Task, spec_hash, tokenizer_spec

__all__ = ["STUDIES", "ORDER", "QUANTIZER_STUDY", "parse_studies", "generator_spec", "consumer_specs", "plan"]


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
ORDER = tuple(STUDIES)   # what "all" runs, and the order of every table
# The unified-model roadmap: run by name, not part of "all" (5 tokenizers + 6 models per seed).
STUDIES[ROADMAP_STUDY.name] = ROADMAP_STUDY


def _quantizer_setting(name: str) -> Setting:
    # Equal bits per token (k x log2 K) and the same k and K for every contender; LFQ spends one latent dimension per
    # bit, so its latent is k x log2 K wide (64 for the tiny preset's 8 x 256) where the others keep the preset's.
    overrides: dict = {"quantizer": name}
    if name == "lfq":
        overrides["latent_dim"] = lambda m: m.num_codebooks * int(math.log2(m.codebook_size))
    return Setting(name, overrides)


# Which quantizer: by name, not part of "all" (5 tokenizers, 5 generators and 5 unified models per seed).
QUANTIZER_STUDY = Study(
    "quantizers", "Which quantizer gives the best tokens for reconstruction, understanding, a generator and a "
    "unified model, at equal bits per token: MCQ, residual VQ, FSQ, LFQ or SimVQ?",
    tuple(_quantizer_setting(name) for name in ("mcq", "rvq", "fsq", "lfq", "simvq")),
    "UniTok compares MCQ only against one large codebook (rFID 0.33 vs 0.70 at 8 x 4096 vs 1 x 32768 codes)",
    consumers=("generator", "mllm"))
STUDIES[QUANTIZER_STUDY.name] = QUANTIZER_STUDY
# What a consumer of the quantizer study trains with: the commands' defaults, in fp32 like every study run.
CONSUMER_GENERATOR_OVERRIDES = ("cpu_bf16=off",)
CONSUMER_MLLM_OVERRIDES = {"image_input": "codebook"}


def parse_studies(text: Union[str, Sequence[str]]) -> List[str]:
    """"codebooks", "codebooks,init" or "all" -> study names, in the canonical order."""
    names = text.split(",") if isinstance(text, str) else list(text)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(ORDER)
    unknown = [n for n in names if n not in STUDIES]
    if unknown or not names:
        raise ValueError(f"unknown study {', '.join(map(repr, unknown)) or 'name (none given)'}; expected one of "
                         f"{', '.join(ORDER)}, a comma-separated list of them, or 'all'; or by name: "
                         f"{', '.join(n for n in STUDIES if n not in ORDER)}")
    return [n for n in ORDER if n in names] + [n for n in STUDIES if n not in ORDER and n in names]


def generator_spec(scale: Scale, setting: Setting, seed: int, tokenizer: Optional[Setting] = None,
                   overrides: Optional[Sequence[str]] = None) -> dict:
    """Everything that determines one generator run: its tokenizer's spec and key (`tokenizer`, or for the
    `generation` study the `codebooks` setting its setting names), the generator's steps, seed and data sizes, and
    its settings (`overrides`; None: the generation study's pinned ones, `GENERATOR_STUDY_SETTINGS`)."""
    tok = tokenizer_spec(scale, tokenizer or STUDIES["codebooks"].setting(setting.tokenizer), seed)
    steps = scale.generator_steps or scale.steps
    # codes of as many training images as the generator sees (at least 2048), held-out NLL on eval_images each
    spec = {"kind": "generator", "tokenizer": tok, "tokenizer_key": spec_hash(tok), "steps": steps, "seed": seed,
            "train_images": min(20_000, max(2048, 64 * steps)), "eval_images": scale.eval_images,
            "samples_per_prompt": 4}
    if overrides is not None:
        spec["generator_overrides"] = list(overrides)
    return spec


def consumer_specs(study: Study, scale: Scale, setting: Setting, seed: int) -> List[dict]:
    """The specs of the models a study trains on each tokenizer setting's codes (`Study.consumers`)."""
    make = {"generator": lambda: generator_spec(scale, setting, seed, setting, CONSUMER_GENERATOR_OVERRIDES),
            "mllm": lambda: mllm_spec(scale, setting, seed, CONSUMER_MLLM_OVERRIDES)}
    return [make[kind]() for kind in study.consumers]


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
                    spec_fn = mllm_spec
                else:
                    spec_fn = generator_spec if study.kind == "generator" else tokenizer_spec
                for spec in (spec_fn(scale, setting, seed), *consumer_specs(study, scale, setting, seed)):
                    tasks.append(Task(name, setting.name, seed, spec, spec_hash(spec)))
    return tasks
