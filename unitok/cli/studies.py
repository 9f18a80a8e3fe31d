"""The studies' commands: `unitok ablate STUDY ...` trains every setting of the paper's ablations (and the
roadmap) with several seeds; `unitok ablate report DIR` summarises them.

    unitok ablate codebooks --seeds 3 --out runs/ablate      # unitok.studies.runner.run_ablation
    unitok ablate roadmap --seeds 3 --model-steps 800        # the unified model on six tokenizers
    unitok ablate quantizers --seeds 3 --jobs 2              # MCQ, RVQ, FSQ, LFQ, SimVQ + what consumes their codes
    unitok ablate report runs/ablate                         # report.md and ablation_<study>.png (unitok.studies.report)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..studies.plan import ORDER
from ..studies.report import format_table, report, summarize
from ..studies.runner import RESULTS, run_ablation
from ..studies.spec import Scale
from .common import Interrupted

__all__ = ["add_study_commands"]


def add_study_commands(sub) -> None:
    """Register `ablate` (STUDY, or `report DIR`) on the `unitok` subcommand parser."""
    a = sub.add_parser("ablate", help="re-run the paper's ablations with seeds; `ablate report DIR` summarises",
                       description="unitok ablate STUDY [--seeds 3] [--steps N] [--out runs/ablate] [--jobs J]\n"
                                   "unitok ablate report DIR\n\nstudies: " + ", ".join(ORDER)
                                   + " (comma-separated, or 'all'); and, asked for by name (not part of 'all'): "
                                     "roadmap, the unified model on six tokenizer variants; quantizers, MCQ against "
                                     "residual VQ, FSQ, LFQ and SimVQ with a generator and a unified model on each",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("study", help=f"one of {', '.join(ORDER)}, roadmap, quantizers, a comma-separated list, 'all', "
                                 "or 'report'")
    a.add_argument("dir", nargs="?", help="for `report`: the ablation folder (or its results.jsonl)")
    a.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per setting (default 3)")
    a.add_argument("--steps", type=int, help=f"training steps per run (default {Scale.steps})")
    a.add_argument("--model-steps", type=int, help="training steps of the generator (generation) and of the unified "
                   "model (roadmap, quantizers) trained on each tokenizer (default: --steps)")
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
    if args.study == "report":
        if not args.dir:
            raise ValueError("`unitok ablate report` needs the ablation folder: unitok ablate report DIR")
        print(report(args.dir))
        out = Path(args.dir) if Path(args.dir).is_dir() else Path(args.dir).parent
        print(f"wrote {out / 'report.md'} and the plots ablation_<study>.png there (interactive HTML versions: "
              f"unitok_widgets.studies.write_html_report)")
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
