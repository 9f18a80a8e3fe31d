"""The `unitok` command: one parser, built from each group's `add_..._commands`, and the error rule that every
command shares (a user error is one line on stderr and exit 2; Ctrl-C is one line and exit 130).

    main(["train", "--out", "runs/tiny"])          # what the `unitok` console script and `python -m unitok.cli` run

The groups: `unitok.cli.tokenizer` (train, eval, export, convert, presets), `unitok.cli.generator`
(train-generator, generate, evaluate-generator), `unitok.cli.mllm` (train-mllm, caption, ask) and
`unitok.cli.studies` (ablate); what they share is `unitok.cli.common`.
"""
from __future__ import annotations

import argparse
import sys

from .common import Interrupted, one_line, user_errors

__all__ = ["main", "build_parser", "USAGE"]

# `unitok --help`
USAGE = """Command line: `unitok train`, `eval`, `export`, `convert`, `presets`, `train-generator`, `generate`,
`evaluate-generator`, `train-mllm`, `caption`, `ask`, `ablate`.

    unitok train --preset tiny --data shapes --out runs/tiny   # the CPU recipe (docs/cpu_recipe.md)
    unitok train --preset tiny --data folder --data-path my_images/captions.csv --out runs/mine --set lr=1e-3
    unitok train --out runs/tiny --resume                 # continue a killed run exactly where it stopped
    torchrun --nproc_per_node=2 -m unitok.cli train ...   # DDP (gloo on CPU, nccl on GPU)
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


def build_parser() -> argparse.ArgumentParser:
    # The groups are imported here, not at the top: `python -m unitok.cli.generator export` (the Makefile's) imports
    # this package first, and a command module already imported by then would run twice (runpy warns about it).
    from .generator import add_generator_commands   # train-generator, generate, evaluate-generator
    from .mllm import add_mllm_commands             # train-mllm, caption, ask (the unified model)
    from .studies import add_study_commands         # ablate STUDY / ablate report DIR
    from .tokenizer import add_tokenizer_commands   # train, eval, export, convert, presets

    ap = argparse.ArgumentParser(prog="unitok", description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    add_tokenizer_commands(sub)
    add_mllm_commands(sub)
    add_generator_commands(sub)
    add_study_commands(sub)
    return ap


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
    except user_errors() as e:  # bad settings or inputs: a message, not a traceback
        if args.debug:
            raise
        message = one_line(e)
        print(f"unitok {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
