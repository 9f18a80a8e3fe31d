"""Unified-model throughput: captioning and text-to-image tokens/s with and without the KV cache; a training step.

    python benchmarks/mllm.py [--batch 8] [--train-batch 32] [--steps 3] [--json FILE]

One process, next to an fp32 matmul-peak measurement (before and after), so times scale to another machine:
time x (measured peak / 192 GFLOP/s) is the time on a 192 GFLOP/s machine (the other benchmarks' convention).
The model is the `tiny` unified model on the bundled tokenizer with random weights (a random, not zero, image
classifier, so sampling draws varied codes); speed does not depend on what was learned. A caption is always
decoded to its full length (no early <eos>: random weights would stop at random points).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import matmul_peak  # noqa: E402  (the same peak measurement as the other benchmarks)

import unitok  # noqa: E402,F401
from unitok.mllm.config import MLLMConfig  # noqa: E402
from unitok.mllm.model import UnifiedModel  # noqa: E402
from unitok.mllm.sequence import SPECIALS  # noqa: E402
from unitok.mllm.text import TextTokenizer  # noqa: E402
from unitok.data.scene_text import canonical_caption, scene_record, text_corpus  # noqa: E402
from unitok.mllm.trainer import MODEL_PRESETS  # noqa: E402
from unitok.data.shapes_dataset import ShapesDataset  # noqa: E402
from unitok.tokenizer.model import UniTok  # noqa: E402
from unitok.training.machine import REFERENCE_GFLOPS, training_autocast  # noqa: E402

REFERENCE_PEAK = REFERENCE_GFLOPS * 1e9   # FLOP/s
ROOT = Path(__file__).resolve().parents[1]


def build():
    tok = UniTok.from_pretrained(ROOT / "data" / "tiny-shapes").eval()
    ds = ShapesDataset(32, "train", length=500)
    records = [scene_record(ds.scene(i)) for i in range(500)]
    text = TextTokenizer.train(text_corpus(records), 400)
    torch.manual_seed(0)
    model = UnifiedModel(MLLMConfig.for_tokenizer(tok, text, **MODEL_PRESETS["tiny"]), tok, text).eval()
    torch.nn.init.normal_(model.image_head.classifier.weight, std=0.05)
    return tok, text, model, records


def _timed(fn, repeats: int = 1, warmup=None) -> float:
    (warmup or fn)()   # the first call pays one-off costs (allocations, kernel selection)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def time_caption(model, batch: int, use_cache: bool) -> dict:
    cfg = model.config
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.num_positions, cfg.num_codebooks))
    eos = SPECIALS.index("<eos>")
    bias = torch.zeros(cfg.vocab_size)
    bias[eos] = -1e9   # never stop early: every caption is target_tokens long
    model.text_head.bias.data += bias
    try:
        steps = cfg.target_tokens
        seconds = _timed(lambda: list(model.text_steps("i2t", codes, max_new_tokens=steps, temperature=1.0,
                                                       use_cache=use_cache)),
                         warmup=lambda: list(model.text_steps("i2t", codes[:1], max_new_tokens=2)))
    finally:
        model.text_head.bias.data -= bias
    return {"seconds": seconds, "tokens_per_second": batch * steps / seconds}


def time_t2i(model, batch: int, use_cache: bool) -> dict:
    seconds = _timed(lambda: model.generate(["a red star"] * batch, cfg_scale=3.0, use_cache=use_cache),
                     warmup=lambda: model.generate(["a red star"], cfg_scale=3.0, use_cache=True))
    positions = model.config.num_positions
    return {"seconds": seconds, "tokens_per_second": batch * positions / seconds}


def time_training(model, records, batch: int, steps: int, cpu_bf16: str = "off") -> dict:
    """A training step of `batch` mixed sequences; `cpu_bf16="on"`: under the trainers' bf16 autocast."""
    cfg = model.config
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(batch):
        rec = records[i]
        codes = torch.randint(0, cfg.codebook_size, (cfg.num_positions, cfg.num_codebooks), generator=g)
        task = ("t2i", "i2t", "vqa")[i % 3]
        items.append({"task": task, "image": codes, "caption": canonical_caption(rec),
                      "question": "what colour is the shape?", "answer": rec["objects"][0][0]})
    batch_dict = model.build_batch(items)
    model.train()
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with training_autocast(torch.device("cpu"), cpu_bf16=cpu_bf16):
            out = model(batch_dict)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    model.eval()
    step = statistics.median(times[1:])
    return {"seconds_per_step": step, "tokens_per_step": int(batch_dict["tokens"].numel()),
            "tokens_per_second": batch_dict["tokens"].numel() / step}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8, help="captions / images decoded at once")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    cpu = torch.device("cpu")
    peak_before = matmul_peak(cpu)
    tok, text, model, records = build()
    with torch.no_grad():
        res = {"caption_cached": time_caption(model, args.batch, True),
               "caption_recomputed": time_caption(model, args.batch, False),
               "t2i_cached": time_t2i(model, args.batch, True),
               "t2i_recomputed": time_t2i(model, args.batch, False)}
    res["train"] = time_training(model, records, args.train_batch, args.steps)
    res["train_bf16"] = time_training(model, records, args.train_batch, args.steps, cpu_bf16="on")
    peak = (peak_before + matmul_peak(cpu)) / 2
    res["matmul_peak_gflops"] = peak / 1e9
    res["parameters"] = model.num_parameters()
    res["kv_cache_speedup_caption"] = res["caption_cached"]["tokens_per_second"] / \
        res["caption_recomputed"]["tokens_per_second"]
    res["kv_cache_speedup_t2i"] = res["t2i_cached"]["tokens_per_second"] / res["t2i_recomputed"]["tokens_per_second"]
    res["train_step_seconds_at_192"] = res["train"]["seconds_per_step"] * peak / REFERENCE_PEAK
    print(f"unified model ({res['parameters'] / 1e6:.2f} M params), fp32 matmul peak {peak / 1e9:.0f} GFLOP/s")
    for key in ("caption_cached", "caption_recomputed", "t2i_cached", "t2i_recomputed"):
        r = res[key]
        print(f"  {key:19s} {r['tokens_per_second']:8.1f} tokens/s  ({r['seconds']:.2f} s for {args.batch})")
    print(f"  KV cache speed-up: caption x{res['kv_cache_speedup_caption']:.1f}, "
          f"t2i x{res['kv_cache_speedup_t2i']:.1f}")
    print(f"  training step ({args.train_batch} sequences, {res['train']['tokens_per_step']} tokens): "
          f"{res['train']['seconds_per_step']:.2f} s here, {res['train_step_seconds_at_192']:.2f} s at 192 GFLOP/s")
    res["bf16_step_speedup"] = res["train"]["seconds_per_step"] / res["train_bf16"]["seconds_per_step"]
    print(f"  the same step in bf16 autocast (cpu_bf16=on): {res['train_bf16']['seconds_per_step']:.2f} s here, "
          f"x{res['bf16_step_speedup']:.2f} against fp32")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
