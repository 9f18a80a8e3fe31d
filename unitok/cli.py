"""Command line: `unitok train`, `unitok eval`, `unitok export`, `unitok presets`.

    unitok train --preset tiny --data shapes --steps 1500 --out runs/tiny
    unitok train --preset tiny --data folder --data-path my_images/captions.csv --out runs/mine --set lr=1e-3
    unitok train --out runs/tiny --resume                 # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 -m unitok.cli train ...   # DDP (gloo on CPU, nccl on GPU)
    unitok eval runs/tiny                                 # re-evaluate the best checkpoint
    unitok export runs/tiny data/tiny-shapes              # the best weights as a small fp16 model folder

Both `train` and `eval` write DIR/summary.json (steps, train_seconds, psnr, ssim, codebook_usage, zero_shot_top1,
zero_shot_top1_heldout for shapes, ...), DIR/reconstructions.png and DIR/codebook_usage.png.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def _train(args) -> int:
    from .config import from_dict, ModelConfig, TrainConfig, Preset, get_preset, apply_overrides
    from .train import Trainer, build_datasets

    out = Path(args.out)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    if args.resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        preset = Preset(from_dict(ModelConfig, saved["model"]), from_dict(TrainConfig, saved["train"]))
        if overrides:
            preset = apply_overrides(preset, overrides)
        spec = saved["data"]
    else:
        if args.resume:
            print(f"note: {out} has no run to resume; starting a new one", file=sys.stderr)
        preset = apply_overrides(get_preset(args.preset), overrides)
        spec = {"name": args.data, "path": args.data_path, "eval_images": preset.train.eval_images}
    if spec["name"] in ("folder", "webdataset") and not spec.get("path"):
        raise SystemExit(f"--data {spec['name']} needs --data-path")
    train_data, eval_data = build_datasets(spec, preset.model.image_size, preset.train.seed)
    trainer = Trainer(preset.model, preset.train, train_data, eval_data, out_dir=out, resume=args.resume,
                      data_spec=spec)
    if trainer.is_main:
        print(f"training {preset.model.image_size}px UniTok ({trainer.model.num_parameters() / 1e6:.1f} M params) on "
              f"{spec['name']} for {preset.train.steps} steps on {trainer.device} "
              f"(starting at step {trainer.step_count}) -> {out}")
    trainer.run()
    trainer.save_checkpoint()
    last = trainer.eval_history[-1] if trainer.eval_history else None
    fresh = last is not None and last["step"] == trainer.step_count and args.fid == "none"
    results = last if fresh else trainer.evaluate(fid=args.fid)  # run() may just have evaluated this step
    summary = trainer.write_summary(results)
    if trainer.is_main:
        _print_summary(summary)
    return 0


def _eval(args) -> int:
    from .model import UniTok
    from .train import build_datasets, evaluate_model, make_summary, pick_device, write_run_outputs

    run = Path(args.run)
    if not (run / "config.json").exists():
        raise SystemExit(f"{run} is not a run folder (no config.json); expected the --out folder of `unitok train`")
    saved = json.loads((run / "config.json").read_text())
    weights = run / "best" if (run / "best" / "model.safetensors").exists() else None
    if weights is None:
        raise SystemExit(f"{run} has no best checkpoint yet (best/model.safetensors); train longer first")
    device = pick_device(args.device)
    model = UniTok.from_pretrained(weights, map_location=str(device))
    spec = dict(saved["data"])
    if args.eval_images:
        spec["eval_images"] = args.eval_images
    _, eval_data = build_datasets(spec, model.config.image_size, saved["train"]["seed"])
    results = evaluate_model(model, eval_data, batch_size=saved["train"]["batch_size"], device=device, fid=args.fid)
    previous = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    summary = make_summary(results, steps=previous.get("steps", 0), train_seconds=previous.get("train_seconds", 0.0),
                           model_config=model.config, data=spec)
    summary["evaluated"] = str(weights)
    write_run_outputs(run, summary, model, eval_data, device)
    _print_summary(summary)
    return 0


def _export(args) -> int:
    from .model import UniTok

    src = Path(args.run)
    src = src / "best" if (src / "best" / "model.safetensors").exists() else src
    model = UniTok.from_pretrained(src)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": None}[args.dtype]
    model.save_pretrained(args.dest, dtype=dtype)
    summary = Path(args.run) / "summary.json"
    if summary.exists():
        Path(args.dest, "summary.json").write_text(summary.read_text())
    size = sum(f.stat().st_size for f in Path(args.dest).iterdir()) / 1e6
    print(f"exported {src} -> {args.dest} ({args.dtype}, {size:.1f} MB)")
    return 0


def _presets(args) -> int:
    from .config import PRESETS, get_preset
    from .model import UniTok

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
    keys = ["steps", "train_seconds", "psnr", "ssim", "codebook_usage", "zero_shot_top1", "zero_shot_top1_heldout",
            "fid", "fid_extractor"]
    for k in keys:
        if k in summary:
            v = summary[k]
            v = [round(x, 3) for x in v] if isinstance(v, list) else (round(v, 4) if isinstance(v, float) else v)
            print(f"  {k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    from .config import PRESETS
    from .data import DATASETS

    ap = argparse.ArgumentParser(prog="unitok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model into a run folder")
    t.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    t.add_argument("--data", default="shapes", choices=DATASETS)
    t.add_argument("--data-path", help="CSV/JSONL file (folder) or shard pattern (webdataset)")
    t.add_argument("--steps", type=int, help="total training steps (default: the preset's)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
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
    x.set_defaults(fn=_export)
    p = sub.add_parser("presets", help="list the presets and their sizes")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(fn=_presets)
    return ap


def main(argv=None) -> int:
    import unitok  # noqa: F401  (applies the torchvision fix before anything imports timm/open_clip)

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, FileNotFoundError) as e:  # bad settings or inputs: a message, not a traceback
        parser.exit(2, f"unitok {args.command}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
