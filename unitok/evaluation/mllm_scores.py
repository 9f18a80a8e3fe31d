"""The unified model's scores: how well it reads images (captions and answers, scored against the scene) and how
well it draws them (prompt accuracy of generated images).

    >>> evaluate_understanding(model, test_set)   # caption attribute accuracy, VQA accuracy per type, text/image NLL
    >>> evaluate_t2i(model, num=4)                # t2i_colour_acc, t2i_shape_acc, t2i_both_acc (and `_heldout`)

`model` is a `unitok.mllm.model.UnifiedModel` and the scene set a `unitok.mllm.tasks.SceneSet`, passed in
(duck-typed, so evaluation never imports the mllm package): the model needs `caption(images)`, `answer(images,
questions)`, `build_batch(items)`, a forward pass with text/image losses, `.text`, `.config` and `train()`/`eval()`;
the scene set `records`, `split`, `image(i, continuous)` and `images(index, continuous)`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..data.scene_text import canonical_caption, eval_questions, fit_prompt, normalize_text, parse_caption
from .generator_scores import evaluate_samples

_LABEL_VALUES = {"colour": 0, "shape": 1, "size": 2, "position": 3}


@torch.no_grad()
def evaluate_understanding(model, sset, max_images: Optional[int] = None,
                           batch_size: int = 128) -> dict:
    """Greedy captions and answers on a SceneSet, scored against its scene labels.

    caption_{colour,shape,size,position,count}_acc: the attribute parsed from the generated caption equals the
    first object's (count: one or two objects); caption_mean_acc their mean. vqa_acc (all questions) and
    vqa_{type}_acc per question type. text_nll: teacher-forced nats per target text token (captions and answers);
    image_nll: nats per sub-code of the images given their canonical caption (models that write images).
    """
    continuous = model.config.image_input == "continuous"
    n = min(len(sset), max_images or len(sset))
    recs = sset.records[:n]
    hits = {k: 0 for k in ("colour", "shape", "size", "position", "count")}
    vqa_hits, vqa_total = {}, {}
    text_nll = text_tok = image_nll = image_sub = 0.0
    was_training = model.training
    model.eval()
    heldout_ok = sset.split == "heldout"
    for s in range(0, n, batch_size):
        idx = list(range(s, min(n, s + batch_size)))
        images = sset.images(idx, continuous)
        for i, cap in zip(idx, model.caption(images)):
            got, objs = parse_caption(cap), recs[i]["objects"]
            truth = objs[0]
            for key, j in _LABEL_VALUES.items():
                hits[key] += got[key] == truth[j]
            hits["count"] += got["count"] == len(objs)
        qs = [(i, *q) for i in idx for q in eval_questions(recs[i], heldout_ok)]
        for q0 in range(0, len(qs), batch_size):
            chunk = qs[q0:q0 + batch_size]
            img = sset.images([c[0] for c in chunk], continuous)
            answers = model.answer(img, [c[2] for c in chunk])
            for (_, qtype, _, truth), ans in zip(chunk, answers):
                vqa_total[qtype] = vqa_total.get(qtype, 0) + 1
                vqa_hits[qtype] = vqa_hits.get(qtype, 0) + (normalize_text(ans) == truth)
        # teacher-forced NLL: captions (i2t), one answer per image (vqa), images (t2i)
        items = [{"task": "i2t", "image": sset.image(i, continuous), "caption": canonical_caption(recs[i])}
                 for i in idx]
        items += [{"task": "vqa", "image": sset.image(i, continuous), "question": q, "answer": a}
                  for i in idx for (_, q, a) in eval_questions(recs[i], heldout_ok)[:1]]
        for part in (items[:len(idx)], items[len(idx):]):    # one task per pass: a per-token mean
            out = model(model.build_batch(part))
            text_nll += float(out.text_loss) * out.text_tokens
            text_tok += out.text_tokens
        if model.config.can_generate:
            items = [{"task": "t2i", "image": sset.image(i, continuous),
                      "caption": fit_prompt(model.text, model.config.caption_tokens, recs[i],
                                            canonical_caption(recs[i]))} for i in idx]
            out = model(model.build_batch(items))
            image_nll += float(out.image_loss) * out.image_subcodes
            image_sub += out.image_subcodes
    model.train(was_training)
    res = {f"caption_{k}_acc": v / n for k, v in hits.items()}
    res["caption_mean_acc"] = sum(res.values()) / len(hits)
    res.update({f"vqa_{k}_acc": vqa_hits[k] / vqa_total[k] for k in vqa_total})
    res["vqa_acc"] = sum(vqa_hits.values()) / max(1, sum(vqa_total.values()))
    res["text_nll"] = text_nll / max(1, text_tok)
    if image_sub:
        res["image_nll"] = image_nll / image_sub
    res["images"] = n
    return res


@torch.no_grad()
def evaluate_t2i(model, num: int = 4, cfg_scale: float = 3.0, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int = 0, classifier=None) -> dict:
    """Prompt accuracy of generated images ("a {colour} {shape}" for the 53 seen and the 11 held-out pairs, `num`
    each), read by the project's shape classifier (`unitok.evaluation.generator_scores.evaluate_samples`):
    t2i_colour_acc, t2i_shape_acc, t2i_both_acc (and `_heldout`)."""
    res = evaluate_samples(model, num=num, temperature=temperature, top_k=top_k, top_p=top_p, cfg_scale=cfg_scale,
                           seed=seed, classifier=classifier, fid=False, heldout=True)
    out = {}
    for key, value in res.items():
        if key.startswith("prompt_"):
            out["t2i_" + key[len("prompt_"):]] = value
    out["t2i_sampling"] = res["sampling"]
    out["t2i_distinct_fraction"] = res.get("distinct_fraction")
    return out
