"""The tokenizer's commands: `unitok train`, `eval`, `export`, `convert`, `presets`.

    unitok train --preset tiny --data shapes --out runs/tiny   # the CPU recipe (docs/cpu_recipe.md)
    unitok train --preset tiny --data folder --data-path my_images/captions.csv --out runs/mine --set lr=1e-3
    unitok train --out runs/tiny --resume                 # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 -m unitok.cli train ...   # DDP (gloo on CPU, nccl on GPU)
    unitok eval runs/tiny                                 # re-evaluate the best checkpoint
    unitok export runs/tiny data/tiny-shapes              # the best weights as a small fp16 model folder
    unitok convert unitok_tokenizer.pth models/unitok     # the released UniTok as a model folder

Both `train` and `eval` write DIR/summary.json (steps, train_seconds, psnr, ssim, codebook_usage, zero_shot_top1,
zero_shot_top1_heldout for shapes, ...), DIR/reconstructions.png and DIR/codebook_usage.png.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .common import Interrupted, interrupt_message, read_json, report_skipped
from ..training.machine import REFERENCE_GFLOPS

__all__ = ["add_tokenizer_commands"]

def _train(args) -> int:
    from ..data.datasets import build_datasets
    from ..tokenizer.config import ModelConfig, Preset, TrainConfig, apply_overrides, from_dict, get_preset, to_dict
    from ..training.resume import decide_run
    from ..training.tokenizer_trainer import Trainer

    out = Path(args.out)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")

    def saved_preset(saved: dict) -> Preset:
        return Preset(from_dict(ModelConfig, saved["model"], "the run's config.json"),
                      from_dict(TrainConfig, saved["train"], "the run's config.json"))

    def requested(saved) -> dict:   # what this command line asks for (of the run it resumes, when saved)
        base = get_preset(args.preset or "tiny") if args.preset or saved is None else saved_preset(saved)
        preset = apply_overrides(base, overrides)
        data = {k: v for k, v in (("name", args.data), ("path", args.data_path)) if v is not None}
        return {"model": to_dict(preset.model), "train": to_dict(preset.train), "data": data}

    # Decide what may happen to the folder before anything expensive (datasets, model) is built.
    plan = decide_run(out, resume=args.resume, overwrite=args.overwrite, command="unitok train", requested=requested,
                      is_main=int(os.environ.get("RANK", "0")) == 0,
                      note=f" (from --preset {args.preset})" if args.preset else "")
    if plan.nothing_to_do:
        print(plan.message)
        return 0
    if plan.resuming:
        preset = apply_overrides(saved_preset(plan.saved), overrides)
        spec = plan.saved["data"]
    else:
        preset = apply_overrides(get_preset(args.preset or "tiny"), overrides)
        spec = {"name": args.data or "shapes", "path": args.data_path, "eval_images": preset.train.eval_images}
    if spec["name"] in ("folder", "webdataset") and not spec.get("path"):
        raise ValueError(f"--data {spec['name']} needs --data-path (a CSV/JSONL file, an image folder or shards)")
    train_data, eval_data = build_datasets(spec, preset.model.image_size, preset.train.seed)
    trainer = Trainer(preset.model, preset.train, train_data, eval_data, out_dir=out, resume=plan.resuming,
                      data_spec=spec)
    trainer.evaluation_progress = True       # an evaluation of 1024 images takes minutes on a CPU: show it
    report_skipped(train_data, out)
    if trainer.is_main:
        print(f"training {preset.model.image_size}px UniTok ({trainer.model.num_parameters() / 1e6:.1f} M params) on "
              f"{spec['name']} for {preset.train.steps} steps on {trainer.device} "
              f"(starting at step {trainer.step_count}) -> {out}")
    try:
        trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(interrupt_message(trainer, f"unitok train --out {out} --resume")) from None
    trainer.save_checkpoint()
    last = trainer.eval_history[-1] if trainer.eval_history else None
    fresh = last is not None and last["step"] == trainer.step_count and args.fid == "none"
    results = last if fresh else trainer.evaluate(fid=args.fid)  # run() may just have evaluated this step
    summary = trainer.write_summary(results)
    trainer.close()
    if trainer.is_main:
        _print_summary(summary)
    return 0


def _eval(args) -> int:
    from ..tokenizer.model import UniTok
    from ..training.runs import RunLock, check_writable
    from ..data.datasets import build_datasets
    from ..evaluation.tokenizer import evaluate_model, make_summary, write_run_outputs
    from ..training.machine import pick_device

    run = Path(args.run)
    if not (run / "config.json").exists():
        raise ValueError(f"{run} is not a run folder (no config.json); expected the --out folder of `unitok train`")
    saved = read_json(run / "config.json", "the run's config")
    weights = run / "best"
    if not (weights / "model.safetensors").exists():
        raise ValueError(f"{run} has no best checkpoint yet (best/model.safetensors); train longer first")
    check_writable(run)  # find out now, not after the whole evaluation
    device = pick_device(args.device)
    with RunLock(run, "unitok eval"):
        model = UniTok.from_pretrained(weights, map_location=str(device))
        spec = dict(saved["data"])
        if args.eval_images:
            spec["eval_images"] = args.eval_images
        _, eval_data = build_datasets(spec, model.config.image_size, saved["train"]["seed"])
        results = evaluate_model(model, eval_data, batch_size=saved["train"]["batch_size"], device=device,
                                 fid=args.fid, progress=True)
        previous = read_json(run / "summary.json", "the run's summary") if (run / "summary.json").exists() else {}
        times = {key: value for key, value in previous.items() if key.endswith("seconds") or "_seconds_" in key}
        summary = make_summary(results, steps=previous.get("steps", 0), times=times, model_config=model.config,
                               data=spec)
        summary["evaluated"] = str(weights)
        write_run_outputs(run, summary, model, eval_data, device)
    _print_summary(summary)
    return 0


def _export(args) -> int:
    from ..tokenizer.model import UniTok
    from ..training.runs import staged_folder

    run, dest = Path(args.run), Path(args.dest)
    src = run / "best" if (run / "best" / "model.safetensors").exists() else run
    if not (src / "model.safetensors").exists():
        raise ValueError(f"{run} holds no model (expected best/model.safetensors in a run folder, or "
                         f"model.safetensors in a model folder)")
    model = UniTok.from_pretrained(src)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}[args.dtype]
    with staged_folder(dest, overwrite=args.overwrite, source=run) as tmp:  # refuses dest inside run / non-empty
        model.save_pretrained(tmp, dtype=dtype)
        if (run / "summary.json").exists():
            (tmp / "summary.json").write_text((run / "summary.json").read_text())
        if (run / "eval.jsonl").exists():   # the run's evaluations over training: where a short live run heads
            (tmp / "eval_history.jsonl").write_text((run / "eval.jsonl").read_text())
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    print(f"exported {src} -> {dest} ({args.dtype}, {size:.1f} MB)")
    return 0


def _convert(args) -> int:
    """The released UniTok checkpoint (a .pth file or a hub repo id) -> config.json + model.safetensors (what
    `UniTok.from_pretrained` reads). A non-empty folder is refused unless --overwrite (its old contents are moved
    aside, not deleted); the files are written into a temporary sibling renamed into place at the end, so an
    interrupted conversion never leaves a half-written model."""
    from ..tokenizer.reference import load_reference
    from ..training.runs import staged_folder

    overrides = {"projection_causal": True} if args.causal else {}
    out = Path(args.out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:  # before loading
        raise ValueError(f"{out} exists and is not an empty folder; choose another folder or pass --overwrite "
                         f"(the old contents are moved aside, not deleted)")
    model = load_reference(args.reference, **overrides)
    with staged_folder(out, overwrite=args.overwrite) as tmp:
        model.save_pretrained(tmp)
    config = json.loads((out / "config.json").read_text())
    print(f"converted {args.reference} -> {out} ({config['encoder']}, {config['encoder_depth']}+"
          f"{config['decoder_depth']} blocks, {config['image_size']} px, {config['num_codebooks']} x "
          f"{config['codebook_size']} codes{', causal projections' if args.causal else ''})")
    return 0


def _presets(args) -> int:
    from ..tokenizer.config import PRESETS, get_preset
    from ..tokenizer.model import UniTok

    for name in PRESETS:
        preset = get_preset(name)
        with torch.device("meta"):
            params = UniTok(preset.model).num_parameters()
        m = preset.model
        print(f"{name:6s} {m.image_size:4d}px  {m.grid_size}x{m.grid_size} tokens  width {m.width}  "
              f"{m.encoder_depth}+{m.decoder_depth} blocks  latent {m.latent_dim} = {m.num_codebooks} x "
              f"{m.latent_dim // m.num_codebooks}-d, {m.codebook_size} codes each  {params / 1e6:.1f} M params")
        if args.verbose:
            print(f"  {preset.model}\n  {preset.train}")
    return 0


def _print_summary(summary: dict) -> None:
    keys = ["steps", "precision", "train_seconds", "eval_seconds", "compile_seconds",
            f"total_seconds_at_{REFERENCE_GFLOPS:.0f}_gflops", "psnr", "ssim", "codebook_usage", "zero_shot_top1",
            "zero_shot_top1_heldout", "fid", "fid_extractor"]
    for k in keys:
        if k in summary:
            v = summary[k]
            v = [round(x, 3) for x in v] if isinstance(v, list) else (round(v, 4) if isinstance(v, float) else v)
            print(f"  {k}: {v}")


def add_tokenizer_commands(sub) -> None:
    """Register `train`, `eval`, `export`, `convert` and `presets` on the `unitok` subcommand parser."""
    from ..tokenizer.config import PRESETS
    from ..data.datasets import DATASETS

    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--preset", choices=sorted(PRESETS), help="model and training preset (default: tiny)")
    t.add_argument("--data", choices=DATASETS, help="dataset (default: shapes)")
    t.add_argument("--data-path", help="CSV/JSONL file (folder) or shard pattern (webdataset)")
    t.add_argument("--steps", type=int, help="total training steps (default: the preset's)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    t.add_argument("--overwrite", action="store_true",
                   help="start again in a folder that holds a run (the old run is moved aside, not deleted)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set num_codebooks=1 --set train.lr=1e-3 (repeatable)")
    t.add_argument("--fid", default="none", help="'none', 'proxy' (EfficientNet-Lite0) or a path to Inception weights")
    t.set_defaults(fn=_train)
    e = sub.add_parser("eval", help="re-evaluate a run's best checkpoint")
    e.add_argument("run")
    e.add_argument("--fid", default="proxy", help="'none', 'proxy' (EfficientNet-Lite0) or a path to Inception weights")
    e.add_argument("--eval-images", type=int)
    e.add_argument("--device", default="auto")
    e.set_defaults(fn=_eval)
    x = sub.add_parser("export", help="write a run's best weights as a model folder (config.json + safetensors)")
    x.add_argument("run")
    x.add_argument("dest")
    x.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    x.add_argument("--overwrite", action="store_true",
                   help="export into a non-empty folder (its old contents are moved aside, not deleted)")
    x.set_defaults(fn=_export)
    c = sub.add_parser("convert", help="write the released UniTok checkpoint as a model folder")
    c.add_argument("reference",
                   help="unitok_tokenizer.pth, or a Hugging Face repo id (FoundationVision/unitok_tokenizer)")
    c.add_argument("out_dir")
    c.add_argument("--overwrite", action="store_true",
                   help="convert into a non-empty folder (its old contents are moved aside, not deleted)")
    c.add_argument("--causal", action="store_true",
                   help="causal attention in the projections (the Feb-2025 release; same keys, other outputs)")
    c.set_defaults(fn=_convert)
    p = sub.add_parser("presets", help="list the presets and their sizes")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=_presets)
