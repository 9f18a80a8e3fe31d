"""Command line: `unitok train`, `eval`, `export`, `convert`, `presets`, `train-generator`, `generate`,
`train-mllm`, `caption`, `ask`, `ablate`.

    unitok train --preset tiny --data shapes --out runs/tiny   # the CPU recipe (docs/cpu_recipe.md)
    unitok train --preset tiny --data folder --data-path my_images/captions.csv --out runs/mine --set lr=1e-3
    unitok train --out runs/tiny --resume                 # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 -m unitok.cli.app train ...   # DDP (gloo on CPU, nccl on GPU)
    unitok eval runs/tiny                                 # re-evaluate the best checkpoint
    unitok export runs/tiny data/tiny-shapes              # the best weights as a small fp16 model folder
    unitok convert unitok_tokenizer.pth models/unitok     # the released UniTok as a model folder
    unitok train-generator --tokenizer data/tiny-shapes --data shapes --out runs/gen   # a generator over its codes
    unitok generate --prompt "a red star" --num 16 --seed 0 --out stars.png            # (the bundled generator)
    unitok train-mllm --tokenizer data/tiny-shapes --data shapes --out runs/mllm      # the unified model
    unitok caption picture.png ; unitok ask picture.png --question "what shape is it?"
    unitok ablate codebooks --seeds 3 --out runs/ablate ; unitok ablate report runs/ablate

Both `train` and `eval` write DIR/summary.json (steps, train_seconds, psnr, ssim, codebook_usage, zero_shot_top1,
zero_shot_top1_heldout for shapes, ...), DIR/reconstructions.png and DIR/codebook_usage.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch


# Settings a resume may change: they alter how long and how often, not what is trained or in which order.
RESUMABLE_TRAIN_KEYS = {"steps", "eval_every", "eval_images", "checkpoint_every", "log_every", "device", "amp",
                        "compile", "num_workers"}


def _resume_conflicts(saved: dict, args, overrides: list) -> list:
    """Every way the command line disagrees with the run being resumed, as readable phrases.

    What the command line asks for is the named `--preset` (or, without one, the saved run) with the `--set`
    overrides applied; any model field, or training field outside RESUMABLE_TRAIN_KEYS, that then differs from the
    saved run is a conflict.
    """
    from ..tokenizer.config import ModelConfig, TrainConfig, Preset, apply_overrides, from_dict, get_preset, to_dict

    conflicts = []
    if args.data is not None and args.data != saved["data"].get("name"):
        conflicts.append(f"--data {args.data} (saved run: {saved['data'].get('name')})")
    if args.data_path is not None and str(args.data_path) != str(saved["data"].get("path")):
        conflicts.append(f"--data-path {args.data_path} (saved run: {saved['data'].get('path')})")
    saved_preset = Preset(from_dict(ModelConfig, saved["model"], "the run's config.json"),
                          from_dict(TrainConfig, saved["train"], "the run's config.json"))
    saved_model, saved_train = to_dict(saved_preset.model), to_dict(saved_preset.train)
    requested = apply_overrides(get_preset(args.preset) if args.preset else saved_preset, overrides)
    source = f" (from --preset {args.preset})" if args.preset else ""
    differ = [(k, v) for k, v in to_dict(requested.model).items() if _plain(v) != _plain(saved_model[k])]
    for k, v in differ[:6]:
        conflicts.append(f"{k}={v!r}{source} (saved run: {saved_model[k]!r})")
    if len(differ) > 6:
        conflicts.append(f"{len(differ) - 6} more model settings")
    for k, v in to_dict(requested.train).items():
        if k not in RESUMABLE_TRAIN_KEYS and _plain(v) != _plain(saved_train[k]):
            conflicts.append(f"train.{k}={v!r}{source} (saved run: {saved_train[k]!r}; changing it would not "
                             f"resume the same run)")
    return conflicts


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


def _saved_step(out: Path) -> int:
    from ..training.checkpoint import read_torch

    ckpt = out / "checkpoint.pt"
    return int(read_torch(ckpt, "the run's checkpoint")["step"]) if ckpt.exists() else 0


def _train(args) -> int:
    from ..tokenizer.config import from_dict, ModelConfig, TrainConfig, Preset, get_preset, apply_overrides
    from ..training.runs import holds_run, prepare_run_folder
    from ..training.tokenizer_trainer import Trainer
    from ..data.datasets import build_datasets

    out = Path(args.out)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    # Decide what may happen to the folder before anything expensive (datasets, model) is built.
    resuming = args.resume and holds_run(out)
    if resuming:
        saved = read_json(out / "config.json", "the run's config")
        conflicts = _resume_conflicts(saved, args, overrides)
        if conflicts:
            raise ValueError(f"--resume conflicts with the run saved in {out}: " + "; ".join(conflicts)
                             + ". Drop these options to continue that run, or use another --out to start a new one")
        preset = apply_overrides(Preset(from_dict(ModelConfig, saved["model"]), from_dict(TrainConfig, saved["train"])),
                                 overrides)
        done = _saved_step(out)
        if preset.train.steps <= done:
            print(f"{out} has already trained {done} steps (the run asks for {preset.train.steps}); nothing to do, "
                  f"nothing changed. To train further: unitok train --out {out} --resume --steps N with N > {done}")
            return 0
        spec = saved["data"]
    else:
        if args.resume:
            print(f"note: {out} has no run to resume; starting a new one", file=sys.stderr)
        preset = apply_overrides(get_preset(args.preset or "tiny"), overrides)
        spec = {"name": args.data or "shapes", "path": args.data_path, "eval_images": preset.train.eval_images}
        if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 owns the folder
            prepare_run_folder(out, resume=False, overwrite=args.overwrite)  # refuses a run, or moves it aside
    if spec["name"] in ("folder", "webdataset") and not spec.get("path"):
        raise ValueError(f"--data {spec['name']} needs --data-path (a CSV/JSONL file, an image folder or shards)")
    train_data, eval_data = build_datasets(spec, preset.model.image_size, preset.train.seed)
    trainer = Trainer(preset.model, preset.train, train_data, eval_data, out_dir=out, resume=resuming,
                      data_spec=spec)
    report_skipped(train_data, out)
    if trainer.is_main:
        print(f"training {preset.model.image_size}px UniTok ({trainer.model.num_parameters() / 1e6:.1f} M params) on "
              f"{spec['name']} for {preset.train.steps} steps on {trainer.device} "
              f"(starting at step {trainer.step_count}) -> {out}")
    try:
        trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(_interrupt_message(trainer, out, "train")) from None
    trainer.save_checkpoint()
    last = trainer.eval_history[-1] if trainer.eval_history else None
    fresh = last is not None and last["step"] == trainer.step_count and args.fid == "none"
    results = last if fresh else trainer.evaluate(fid=args.fid)  # run() may just have evaluated this step
    summary = trainer.write_summary(results)
    trainer.close()
    if trainer.is_main:
        _print_summary(summary)
    return 0


def _interrupt_message(trainer, out: Path, command: str) -> str:
    """One line: where training stopped, what is on disk, and how to continue."""
    saved = trainer.last_checkpoint_step()
    where = (f"the last checkpoint is step {saved} in {out / 'checkpoint.pt'}" if saved is not None
             else "no checkpoint was written yet")
    return (f"stopped at step {trainer.step_count}; {where}; resume with: unitok {command} --out {out} --resume")


def report_skipped(dataset, out: Path) -> None:
    """Say how many input files were skipped and why, and list them all in OUT/skipped.txt."""
    from collections import Counter
    from ..training.runs import atomic_write_text

    skipped = list(getattr(dataset, "skipped", None) or [])
    if not skipped:
        return
    reasons = Counter(reason.split(" (")[0] for _, reason in skipped)
    atomic_write_text(out / "skipped.txt", "".join(f"{path}\t{reason}\n" for path, reason in skipped))
    print(f"note: skipped {len(skipped)} input files (" + ", ".join(f"{n} {r}" for r, n in reasons.most_common())
          + f"); the full list is in {out / 'skipped.txt'}", file=sys.stderr)


def read_json(path: Path, what: str) -> dict:
    """A JSON file the user's folder should hold, or a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; expected {what} there") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); expected {what}") from None


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
                                 fid=args.fid)
        previous = read_json(run / "summary.json", "the run's summary") if (run / "summary.json").exists() else {}
        summary = make_summary(results, steps=previous.get("steps", 0),
                               train_seconds=previous.get("train_seconds", 0.0), model_config=model.config, data=spec)
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
    size = sum(f.stat().st_size for f in dest.iterdir()) / 1e6
    print(f"exported {src} -> {dest} ({args.dtype}, {size:.1f} MB)")
    return 0


def _convert(args) -> int:
    """The released UniTok checkpoint (a .pth file or a hub repo id) -> config.json + model.safetensors."""
    from ..tokenizer.reference import convert

    overrides = {"projection_causal": True} if args.causal else {}
    out = convert(args.reference, args.out_dir, overwrite=args.overwrite, **overrides)
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
    keys = ["steps", "train_seconds", "psnr", "ssim", "codebook_usage", "zero_shot_top1", "zero_shot_top1_heldout",
            "fid", "fid_extractor"]
    for k in keys:
        if k in summary:
            v = summary[k]
            v = [round(x, 3) for x in v] if isinstance(v, list) else (round(v, 4) if isinstance(v, float) else v)
            print(f"  {k}: {v}")


def build_parser() -> argparse.ArgumentParser:
    from ..tokenizer.config import PRESETS
    from ..data.datasets import DATASETS

    ap = argparse.ArgumentParser(prog="unitok", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
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
    from .mllm import add_mllm_commands   # train-mllm, caption, ask (the unified model)

    add_mllm_commands(sub)
    from .generator import add_generator_commands   # train-generator, generate

    add_generator_commands(sub)
    from ..studies.ablate import add_ablate_command    # ablate STUDY / ablate report DIR

    add_ablate_command(sub)
    return ap


class Interrupted(Exception):
    """Ctrl-C during a command, with the one line that tells the user where things stand."""


def _user_errors() -> tuple:
    """Exceptions a user can cause (bad settings, files, folders, devices): one line, exit 2, no traceback."""
    import pickle
    from safetensors import SafetensorError

    return (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError,
            pickle.UnpicklingError, SafetensorError)


def _one_line(error: BaseException, limit: int = 4000) -> str:
    """An exception's message on one line (multi-line lists joined with "; "), shortened past `limit` chars."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = " ".join(lines[:1] + ["; ".join(lines[1:])]).strip() if lines else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def run_reporting_errors(prog: str, fn, debug: bool = False) -> int:
    """Run fn() for a `python -m unitok.<module>` entry point with the CLI's rule: a user error is one line on
    stderr and exit 2, not a traceback (debug=True re-raises)."""
    try:
        fn()
        return 0
    except _user_errors() as e:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def main(argv=None) -> int:
    import unitok  # noqa: F401  (applies the torchvision fix before anything imports timm/open_clip)

    parser = build_parser()
    for action in parser._subparsers._group_actions:  # --debug on every subcommand
        for sub in action.choices.values():
            sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except Interrupted as e:
        if args.debug:
            raise
        print(f"unitok {args.command}: interrupted: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"unitok {args.command}: interrupted; nothing was left half-written", file=sys.stderr)
        return 130
    except _user_errors() as e:  # bad settings or inputs: a message, not a traceback
        if args.debug:
            raise
        message = _one_line(e)
        print(f"unitok {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
