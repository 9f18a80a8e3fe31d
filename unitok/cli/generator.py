"""Command line for the generator: `unitok train-generator`, `unitok generate`, `unitok evaluate-generator`, and
`python -m unitok.cli.generator export` (a run's best generator as a small folder; what `make generator` runs).

    unitok train-generator --tokenizer data/tiny-shapes --data shapes --out runs/gen [--steps N] [--set key=value]
    unitok train-generator --tokenizer data/tiny-shapes --out runs/gen --resume     # continue a killed run
    unitok generate --prompt "a red star" --num 16 --seed 0 --out stars.png         # the bundled generator
    unitok generate --generator runs/gen/best --class 3 --num 8 --out x.npz         # images (N,H,W,3), codes
    unitok evaluate-generator --generator runs/gen --num 8                          # prompt accuracy, diversity
    python -m unitok.cli.generator export runs/gen data/my-generator                # fp16 folder for `generate`

`train-generator` writes the run folder: config.json, metrics.jsonl, eval.jsonl, checkpoint.pt, best/ (lowest
held-out NLL), final/, samples.png and summary.json (held-out NLL, prompt accuracy, diversity, proxy FID, code use).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..data.bundled import BUNDLED_GENERATOR, BUNDLED_TOKENIZER
from ..transformer.sampling import check_sampling
from .common import Interrupted, interrupt_message, load_mllm_folder, run_reporting_errors

# sampling settings used when a generator folder does not recommend its own
DEFAULT_SAMPLING = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "cfg_scale": 3.0}


def add_generator_commands(sub) -> None:
    """Register `train-generator`, `generate` and `evaluate-generator` on the `unitok` subcommand parser."""
    t = sub.add_parser("train-generator", help="train an autoregressive generator on a frozen tokenizer's codes")
    t.add_argument("--tokenizer", default=str(BUNDLED_TOKENIZER),
                   help="tokenizer model folder (default: the bundled data/tiny-shapes)")
    t.add_argument("--data", default="shapes", help="dataset whose images are tokenized (default: shapes)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", choices=["tiny", "base"],
                   help="generator size (default: tiny; on --resume, the saved run's)")
    t.add_argument("--steps", type=int, help="total training steps (default: the preset's)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a generator or training field, e.g. --set head=parallel --set lr=5e-4")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds a run (the old run is moved aside, not deleted)")
    t.add_argument("--samples-per-prompt", type=int, default=8,
                   help="samples per 'a {colour} {shape}' prompt for the final prompt accuracy (0: skip)")
    t.add_argument("--no-fid", action="store_true", help="skip the proxy FID of the samples")
    t.set_defaults(fn=_train_generator)
    g = sub.add_parser("generate", help="sample images from a trained generator")
    g.add_argument("--generator", default=str(BUNDLED_GENERATOR),
                   help="generator folder (default: the bundled data/tiny-generator)")
    g.add_argument("--prompt", help='text prompt, e.g. "a red star"')
    g.add_argument("--class", dest="label", type=int, help="class index (class-conditional generators)")
    g.add_argument("--num", type=int, default=16, help="number of images")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--top-p", type=float)
    g.add_argument("--cfg-scale", type=float, help="classifier-free guidance (1 = off)")
    g.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="draw N candidates per image, keep the one the tokenizer's CLIP side finds closest to the "
                        "prompt (1 = off; N times slower)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--out", required=True,
                   help="FILE.png (a grid), FILE.npz (images uint8, codes int64) or DIR (grid.png + one PNG a sample)")
    g.add_argument("--mllm", nargs="?", const="", metavar="DIR",
                   help="draw with a unified model instead (bare --mllm: the bundled data/tiny-mllm)")
    g.set_defaults(fn=_generate)
    e = sub.add_parser("evaluate-generator", help="score a generator's samples for the 'a {colour} {shape}' prompts: "
                                                  "prompt accuracy, diversity, code usage, proxy FID")
    e.add_argument("--generator", default=str(BUNDLED_GENERATOR),
                   help="generator or train-generator run folder (default: the bundled data/tiny-generator)")
    e.add_argument("--num", type=int, default=8, help="samples per prompt (default: 8)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--sampling", action="append", metavar="KEY=VALUE",
                   help="override a recommended sampling setting, e.g. --sampling cfg_scale=3 --sampling top_k=0")
    e.add_argument("--rerank", type=int, default=1, metavar="N",
                   help="score best-of-N samples, ranked by the tokenizer's image-text match (1 = plain sampling)")
    e.add_argument("--no-fid", action="store_true", help="skip the proxy FID")
    e.add_argument("--classifier-steps", type=int, default=600,
                   help="training steps of the measuring classifier, trained once and cached (default: 600, the "
                        "one every documented number uses; fewer only for a quick check)")
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", help="also write the metrics to this .json file")
    e.set_defaults(fn=_evaluate_generator)


def _train_generator(args) -> int:
    from ..evaluation.generator_scores import evaluate_samples
    from ..evaluation.shape_classifier import load_shape_classifier
    from ..generator.codes import extract_run_codes
    from ..generator.trainer import GeneratorTrainer, generator_configs
    from ..tokenizer.model import UniTok
    from ..checkpoint import tokenizer_hash
    from ..training.resume import decide_run

    out = Path(args.out)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.data != "shapes":
        raise ValueError(f"--data {args.data!r}: the generator's prompts and metrics are defined for 'shapes'")
    tokenizer = UniTok.from_pretrained(args.tokenizer)
    digest = tokenizer_hash(tokenizer)

    def requested(saved) -> dict:   # what this command line asks for (of the run it resumes, when saved)
        gen, train = generator_configs(tokenizer, "shapes", args.preset, overrides, saved=saved)
        return {"generator": dataclasses.asdict(gen), "train": dataclasses.asdict(train),
                "data": {"name": "shapes", "tokenizer_sha256": digest}}

    # decided before the expensive code extraction, and before any file is opened for writing
    plan = decide_run(out, resume=args.resume, overwrite=args.overwrite, command="unitok train-generator",
                      requested=requested, note=f" (from --preset {args.preset})" if args.preset else "")
    if plan.nothing_to_do:
        print(plan.message)
        return 0
    gen, train = generator_configs(tokenizer, "shapes", None if plan.resuming else args.preset, overrides,
                                   saved=plan.saved)
    codes, evals = extract_run_codes(tokenizer, "shapes", train, digest)
    trainer = GeneratorTrainer(gen, train, tokenizer, codes, evals, out_dir=out, resume=plan.resuming,
                               tokenizer_path=args.tokenizer, data_spec={"name": "shapes", "tokenizer_sha256": digest})
    print(f"training a {trainer.gen_config.head}-head generator ({trainer.generator.num_parameters() / 1e6:.2f} M "
          f"params, condition {trainer.gen_config.condition}) on {len(trainer.train_codes)} tokenized images for "
          f"{trainer.config.steps} steps on {trainer.device} (starting at step {trainer.step_count}) -> {out}")
    try:
        trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(interrupt_message(
            trainer, f"unitok train-generator --tokenizer {args.tokenizer} --out {out} --resume")) from None
    trainer.save_checkpoint()
    if not trainer.eval_history or trainer.eval_history[-1]["step"] != trainer.step_count:
        trainer.evaluate()
    extra = {}
    if args.samples_per_prompt > 0:
        classifier = load_shape_classifier(tokenizer.config.image_size)
        sampling = dict(DEFAULT_SAMPLING)
        extra = evaluate_samples(trainer.generator, num=args.samples_per_prompt, classifier=classifier,
                                 fid=not args.no_fid, **sampling)
        extra["classifier_accuracy"] = classifier.accuracy
        _write_samples_png(trainer.generator, out / "samples.png", sampling)
    summary = trainer.write_summary(extra)
    trainer.close()
    for k in ("steps", "train_seconds", "bits_per_subcode_test", "bits_per_image_test", "bits_per_subcode_heldout",
              "prompt_colour_acc", "prompt_shape_acc", "prompt_colour_acc_heldout", "prompt_shape_acc_heldout",
              "distinct_fraction", "diversity", "diversity_real", "fid_proxy", "code_usage", "code_usage_real"):
        if k in summary:
            v = summary[k]
            print(f"  {k}: {round(v, 4) if isinstance(v, float) else v}")
    return 0


def _write_samples_png(generator, path: Path, sampling: dict) -> None:
    from PIL import Image

    from ..data.images import make_grid_image
    from ..checkpoint import atomic_write

    prompts = ["a red circle", "a green square", "a blue star", "a yellow heart", "a purple triangle",
               "a white cross", "a cyan diamond", "a orange crescent"]
    codes = generator.generate(prompts=prompts, num=8, seed=0, **sampling)
    grid = make_grid_image(generator.decode(codes).cpu(), nrow=8)
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


def load_generator(directory, device: str = "cpu"):
    """A generator folder (or a run folder: its best/, else final/) -> TokenGenerator with its tokenizer."""
    from ..generator.model import TokenGenerator

    directory = Path(directory)
    for candidate in (directory, directory / "best", directory / "final"):
        if (candidate / "model.safetensors").is_file():
            return TokenGenerator.from_pretrained(candidate, map_location=device), candidate
    raise FileNotFoundError(f"{directory} holds no generator (model.safetensors); expected a folder written by "
                            f"`unitok train-generator` (or its best/ or final/ sub-folder)")


def recommended_sampling(directory: Path) -> dict:
    meta = json.loads((Path(directory) / "config.json").read_text())
    return {**DEFAULT_SAMPLING, **{k: v for k, v in meta.get("sampling", {}).items() if k in DEFAULT_SAMPLING}}


def _generate(args) -> int:
    from PIL import Image

    from ..data.images import make_grid_image, to_uint8_image
    from ..checkpoint import atomic_write

    out = Path(args.out)
    as_folder = out.is_dir() or not out.suffix
    if not as_folder and out.suffix.lower() not in (".png", ".npz"):
        raise ValueError(f"--out must be a folder (a grid and one PNG per sample), or end in .png (a grid) or .npz "
                         f"(arrays), got {out.name!r}")
    if as_folder and out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is a folder that is not empty; choose an empty or new folder")
    if args.prompt is None and args.label is None:
        raise ValueError("expected --prompt TEXT or --class N")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("expected a non-empty --prompt, got an empty string")
    if args.num < 1:
        raise ValueError(f"--num must be >= 1, got {args.num}")
    _check_rerank_flag(args.rerank)
    if getattr(args, "mllm", None) is not None:   # a unified model draws through the same interface
        if args.label is not None:
            raise ValueError("--class needs a class-conditional generator; a unified model takes --prompt")
        generator, folder = load_mllm_folder(args.mllm or None, args.device)
    else:
        generator, folder = load_generator(args.generator, args.device)
    sampling = recommended_sampling(folder)
    for key, value in (("temperature", args.temperature), ("top_k", args.top_k), ("top_p", args.top_p),
                       ("cfg_scale", args.cfg_scale)):
        if value is not None:
            sampling[key] = value
    if args.label is not None and generator.config.condition != "class":
        raise ValueError(f"--class needs a class-conditional generator; {folder} is conditioned on "
                         f"{generator.config.condition} (use --prompt)")
    kwargs = {"labels": [args.label]} if args.label is not None else {"prompts": [args.prompt]}
    with torch.no_grad():
        codes = generator.generate(**kwargs, num=args.num, seed=args.seed, rerank=args.rerank, **sampling)
        images = generator.decode(codes).cpu()
    out.parent.mkdir(parents=True, exist_ok=True)
    if as_folder:     # grid.png and sample_000.png, ... written into a temporary sibling, renamed into place
        from ..training.runs import staged_folder

        with staged_folder(out) as tmp:
            Image.fromarray(make_grid_image(images, nrow=min(8, args.num))).save(tmp / "grid.png")
            for i, picture in enumerate(to_uint8_image(images)):
                Image.fromarray(picture).save(tmp / f"sample_{i:03d}.png")
    elif out.suffix.lower() == ".png":
        grid = make_grid_image(images, nrow=min(8, args.num))
        atomic_write(out, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))
    else:
        arrays = {"images": to_uint8_image(images), "codes": codes.cpu().long().numpy().astype(np.int64)}

        def write_npz(tmp):
            with open(tmp, "wb") as f:   # a file object: np.savez would append ".npz" to a temporary name
                np.savez(f, **arrays)

        atomic_write(out, write_npz)
    what = f"prompt {args.prompt!r}" if args.prompt is not None else f"class {args.label}"
    if args.rerank > 1:
        sampling["rerank"] = args.rerank
    print(f"wrote {args.num} samples for {what} ({', '.join(f'{k}={v}' for k, v in sampling.items())}, "
          f"seed {args.seed}) -> {out}")
    return 0


def _check_rerank_flag(rerank: int) -> None:   # before any loading: the flag's own words in the message
    if rerank < 1:
        raise ValueError(f"--rerank must be >= 1 (candidates per image; 1 = off), got {rerank}")


def _evaluate_generator(args) -> int:
    from ..evaluation.generator_scores import evaluate_samples
    from ..evaluation.shape_classifier import load_shape_classifier
    from ..training.runs import atomic_write_text

    if args.num < 1:
        raise ValueError(f"--num must be >= 1 (samples per prompt), got {args.num}")
    _check_rerank_flag(args.rerank)
    if args.classifier_steps < 1:
        raise ValueError(f"--classifier-steps must be >= 1, got {args.classifier_steps}")
    if args.out is not None and not args.out.lower().endswith(".json"):
        raise ValueError(f"--out must end in .json, got {Path(args.out).name!r}")
    generator, folder = load_generator(args.generator, args.device)
    sampling = {**recommended_sampling(folder), **parse_sampling(args.sampling)}
    check_sampling(**sampling)
    classifier = load_shape_classifier(generator.tokenizer.config.image_size, steps=args.classifier_steps)
    with torch.no_grad():
        metrics = evaluate_samples(generator, num=args.num, seed=args.seed, classifier=classifier,
                                   fid=not args.no_fid, rerank=args.rerank, **sampling)
    metrics = {"generator": str(folder), **metrics, "classifier_accuracy": classifier.accuracy}
    print(f"{folder}: {', '.join(f'{k}={v}' for k, v in metrics['sampling'].items())}")
    for k, v in metrics.items():
        if isinstance(v, float):
            print(f"  {k}: {v:.4f}")
    if args.out is not None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out), json.dumps(metrics, indent=2))
        print(f"wrote {args.out}")
    return 0


def parse_sampling(items) -> dict:
    """["top_k=4", "cfg_scale=3"] -> {"top_k": 4, "cfg_scale": 3.0}; ValueError naming the expected keys."""
    out = {}
    for item in items or []:
        key, sep, value = str(item).partition("=")
        if not sep or key not in DEFAULT_SAMPLING:
            raise ValueError(f"expected KEY=VALUE with KEY one of {sorted(DEFAULT_SAMPLING)}, got {item!r}")
        kind = type(DEFAULT_SAMPLING[key])
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"expected {key}=<{kind.__name__}>, got {item!r}") from None
    return out


def export_generator(run, dest, overwrite: bool = True, sampling: Optional[dict] = None) -> Path:
    """A run folder's best generator (lowest held-out NLL) -> `dest` as fp16 weights + config.json, with the
    tokenizer path rewritten relative to `dest`, the recommended sampling settings and the run's summary.

    sampling: recommended settings that `unitok generate` will use for this folder; by default the ones the run's
    summary was measured with. The summary is copied unchanged, so its numbers keep saying which settings made them.
    """
    from ..training.runs import atomic_write_text, staged_folder

    run = Path(run)
    generator, folder = load_generator(run)
    meta = json.loads((folder / "config.json").read_text())
    tokenizer_dir = (folder / meta["tokenizer"]).resolve() if meta.get("tokenizer") else None
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    recommended = {k: v for k, v in summary.get("sampling", DEFAULT_SAMPLING).items() if k in DEFAULT_SAMPLING}
    recommended.update(sampling or {})
    check_sampling(**{**DEFAULT_SAMPLING, **recommended})
    dest = Path(dest)
    with staged_folder(dest, overwrite=overwrite) as tmp:
        generator.save_pretrained(tmp, tokenizer_path=tokenizer_dir, dtype=torch.float16,
                                  extra={"sampling": recommended, "steps": meta.get("steps")})
        meta_new = json.loads((tmp / "config.json").read_text())
        if tokenizer_dir is not None:   # relative to the final folder, not the temporary one
            import os
            meta_new["tokenizer"] = os.path.relpath(tokenizer_dir, dest.resolve())
            atomic_write_text(tmp / "config.json", json.dumps(meta_new, indent=2))
        if summary:
            atomic_write_text(tmp / "summary.json", json.dumps(summary, indent=2))
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    print(f"exported {folder} -> {dest} (float16, {size:.1f} MB)")
    return dest


if __name__ == "__main__":   # python -m unitok.cli.generator export RUN DEST (what `make generator` runs)
    import argparse

    ap = argparse.ArgumentParser(prog="python -m unitok.cli.generator")
    sub = ap.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="a train-generator run's best generator as a small fp16 folder")
    e.add_argument("run")
    e.add_argument("dest")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty DEST (its old contents are moved aside, not deleted)")
    e.add_argument("--sampling", action="append", metavar="KEY=VALUE",
                   help="recommend a sampling setting for `unitok generate`, e.g. --sampling top_k=4 (default: the "
                        "settings the run's summary was measured with)")
    e.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args()
    sys.exit(run_reporting_errors(
        "python -m unitok.cli.generator export",
        lambda: export_generator(a.run, a.dest, overwrite=a.overwrite, sampling=parse_sampling(a.sampling)), a.debug))
