"""Command line of the unified model: `unitok train-mllm`, `unitok caption`, `unitok ask`, `unitok generate --mllm`,
and `python -m unitok.cli.mllm export RUN DEST` (a run's weights as a small fp16 folder; what `make mllm` runs).

    unitok train-mllm --tokenizer data/tiny-shapes --data shapes --out runs/mllm [--steps N] [--set key=value]
    unitok caption picture.png other.jpg                  # {"image": PATH, "caption": "..."} per line
    unitok ask picture.png --question "what colour is the shape?"       # {"image": ..., "question": ..., "answer": ...}
    unitok generate --mllm --prompt "a red star" --num 8 --out stars.png   # the generator's command and output

Without --mllm, `caption` and `ask` use the bundled unified model (data/tiny-mllm); `generate --mllm` with no
folder does too. Pictures of any size or mode are converted to RGB and resized to the tokenizer's size (with a
one-line notice on stderr).
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from ..data.bundled import BUNDLED_MLLM as BUNDLED
from .common import Interrupted, interrupt_message, load_mllm_folder, run_reporting_errors

COMMAND = "unitok train-mllm"


def bundled_mllm_path() -> Path:
    return BUNDLED


def load_mllm(path=None, device: str = "cpu"):
    """A UnifiedModel from a model folder, a run folder (its best/ or final/ weights) or the bundled one."""
    return load_mllm_folder(path, device)[0]


def read_pictures(paths, image_size: int):
    """Picture files -> (B, 3, S, S) in [-1, 1]; a one-line notice for each converted or resized picture."""
    import torch
    from PIL import Image, UnidentifiedImageError

    from ..data.images import pil_to_tensor

    out = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            raise ValueError(f"{path} is a folder; expected a picture file (PNG, JPEG, ...): name the pictures, "
                             f"e.g. {path}/*.png")
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found; expected a picture file (PNG, JPEG, ...)")
        try:
            with Image.open(path) as image:
                image.load()
                size, mode = image.size, image.mode
                tensor = pil_to_tensor(image, image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{path} is not a picture PIL can read ({type(e).__name__}); expected PNG, JPEG, "
                             f"...") from None
        if min(size) >= 2 * image_size and (size[0] % image_size == 0 and size[1] % image_size == 0):
            print(f"warning: {path} is {size[0]}x{size[1]}, a grid of {size[0] // image_size}x{size[1] // image_size}"
                  f" pictures of {image_size} px? It is read as one picture, squeezed to {image_size} px; cut it "
                  f"into single pictures first", file=sys.stderr)
        elif size != (image_size, image_size) or mode != "RGB":
            print(f"note: {path}: {size[0]}x{size[1]} {mode} converted to {image_size}x{image_size} RGB",
                  file=sys.stderr)
        out.append(tensor)
    return torch.stack(out)


def _train_mllm(args) -> int:
    from ..mllm.text import TextTokenizer
    from ..mllm.trainer import MLLMTrainer, mllm_configs
    from ..tokenizer.model import UniTok
    from ..checkpoint import tokenizer_hash
    from ..training.machine import REFERENCE_GFLOPS
    from ..training.resume import decide_run
    from .common import read_json

    if args.data != "shapes":
        raise ValueError(f"--data {args.data}: the unified model's tasks are built from the shapes labels; "
                         f"expected --data shapes")
    out = Path(args.out)
    overrides = list(args.set or [])
    if args.steps is not None:
        overrides.append(f"train.steps={args.steps}")
    tok_path = Path(args.tokenizer)
    tokenizer = UniTok.from_pretrained(tok_path)
    digest = tokenizer_hash(tokenizer)

    def requested(saved) -> dict:   # what this command line asks for (of the run it resumes, when saved)
        model_cfg, train = mllm_configs(tokenizer, args.preset, overrides, saved=saved)
        return {"mllm": dataclasses.asdict(model_cfg), "train": dataclasses.asdict(train),
                "data": {"name": "shapes", "tokenizer_sha256": digest}}

    plan = decide_run(out, resume=args.resume, overwrite=args.overwrite, command=COMMAND, requested=requested,
                      note=f" (from --preset {args.preset})" if args.preset else "")
    if plan.nothing_to_do:
        print(plan.message)
        return 0
    text = (TextTokenizer.from_json(read_json(out / "text_tokenizer.json", "the run's text tokenizer"))
            if plan.resuming else None)
    trainer = MLLMTrainer.from_tokenizer(tokenizer, tok_path, preset=None if plan.resuming else args.preset,
                                         overrides=overrides, out_dir=out, resume=plan.resuming, text=text,
                                         saved=plan.saved)
    print(f"training a unified model ({trainer.model.num_parameters() / 1e6:.2f} M params, image input "
          f"{trainer.model_config.image_input}) on {len(trainer.train_set)} shapes images for "
          f"{trainer.config.steps} steps (starting at step {trainer.step_count}) -> {out}", file=sys.stderr)
    try:
        trainer.run()
    except KeyboardInterrupt:
        raise Interrupted(interrupt_message(trainer, f"{COMMAND} --tokenizer {tok_path} --out {out} --resume")) \
            from None
    trainer.save_checkpoint()
    results = trainer.evaluate(t2i=not args.no_t2i_eval)
    summary = trainer.write_summary(results)
    trainer.close()
    keys = ["steps", "train_seconds", f"train_seconds_at_{REFERENCE_GFLOPS:.0f}_gflops", "caption_colour_acc_test",
            "caption_shape_acc_test", "caption_position_acc_test", "caption_count_acc_test", "vqa_acc_test",
            "vqa_acc_heldout", "t2i_colour_acc", "t2i_shape_acc", "t2i_colour_acc_heldout", "t2i_shape_acc_heldout"]
    for k in keys:
        if k in summary:
            v = summary[k]
            print(f"  {k}: {round(v, 4) if isinstance(v, float) else v}")
    return 0


def _caption(args) -> int:
    model = load_mllm(args.mllm, args.device)
    pictures = read_pictures(args.images, model.tokenizer.config.image_size)
    captions = model.caption(pictures, temperature=args.temperature, seed=args.seed)
    for path, cap in zip(args.images, captions):
        print(json.dumps({"image": str(path), "caption": cap}))
    return 0


def _ask(args) -> int:
    if not args.question or not args.question.strip():
        raise ValueError("--question is empty; expected a question such as \"what colour is the shape?\"")
    model = load_mllm(args.mllm, args.device)
    pictures = read_pictures([args.image], model.tokenizer.config.image_size)
    (answer,), (detail,) = model.answer(pictures, [args.question], with_probs=True, temperature=args.temperature,
                                        seed=args.seed)
    prob = 1.0
    for _, p in detail:
        prob *= p
    print(json.dumps({"image": str(args.image), "question": args.question, "answer": answer,
                      "probability": round(prob, 4)}))
    return 0


def add_mllm_commands(sub) -> None:
    """Add train-mllm, caption and ask to the `unitok` subparsers."""
    t = sub.add_parser("train-mllm", help="train a unified model (reads and writes images) over a frozen tokenizer")
    t.add_argument("--tokenizer", default=str(BUNDLED.parent / "tiny-shapes"),
                   help="the frozen UniTok folder (default: the bundled data/tiny-shapes)")
    t.add_argument("--data", default="shapes", help="dataset (shapes: tasks are built from its labels)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--preset", help="model size: tiny (default) or small; on --resume, the saved run's")
    t.add_argument("--steps", type=int, help="total training steps (default: the config's)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting, e.g. --set image_input=embedding --set train.lr=1e-3 (repeatable)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    t.add_argument("--overwrite", action="store_true", help="start again in a folder holding a run (moved aside)")
    t.add_argument("--no-t2i-eval", action="store_true", help="skip drawing and classifying pictures at the end")
    t.set_defaults(fn=_train_mllm)
    for name, fn, helptext in (("caption", _caption, "describe pictures with a unified model"),
                               ("ask", _ask, "answer a question about a picture with a unified model")):
        p = sub.add_parser(name, help=helptext)
        if name == "caption":
            p.add_argument("images", nargs="+", help="picture files (any size or mode)")
        else:
            p.add_argument("image", help="a picture file (any size or mode)")
            p.add_argument("--question", "-q", required=True, help='e.g. "what colour is the shape?"')
        p.add_argument("--mllm", help="unified-model folder or run folder (default: the bundled data/tiny-mllm)")
        p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--device", default="cpu")
        p.set_defaults(fn=fn)


def export(run, dest, overwrite: bool = False) -> Path:
    """A run's final (else best) weights -> a small fp16 model folder that finds its tokenizer on its own
    (`make checkpoint-mllm` writes data/tiny-mllm this way), with the run's summary.json."""
    import torch

    from ..training.runs import staged_folder

    run, dest = Path(run), Path(dest)
    model, folder = load_mllm_folder(run / "final" if (run / "final").is_dir() else run)
    meta = getattr(model, "meta", {})
    tok_path = (folder / meta["tokenizer"]).resolve() if meta.get("tokenizer") else None
    with staged_folder(dest, overwrite=overwrite, source=run) as tmp:
        extra = {k: v for k, v in meta.items() if k not in ("mllm", "tokenizer", "tokenizer_sha256")}
        # relative to dest (not to the staging folder, a sibling of dest at the same depth)
        model.save_pretrained(tmp, tokenizer_path=None, dtype=torch.float16, extra=extra)
        config = json.loads((tmp / "config.json").read_text())
        if tok_path is not None:
            import os
            config["tokenizer"] = os.path.relpath(tok_path, dest.resolve().parent / dest.name)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        if (run / "summary.json").exists():
            (tmp / "summary.json").write_text((run / "summary.json").read_text())
    return dest


if __name__ == "__main__":   # python -m unitok.cli.mllm export RUN DEST [--overwrite]
    import argparse

    ap = argparse.ArgumentParser(prog="python -m unitok.cli.mllm")
    ap.add_argument("action", choices=["export"])
    ap.add_argument("run")
    ap.add_argument("dest")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    a = ap.parse_args()
    sys.exit(run_reporting_errors("python -m unitok.cli.mllm export",
                                  lambda: print(f"exported {a.run} -> {export(a.run, a.dest, a.overwrite)}"), a.debug))
