"""The unified model: text tokenizer, sequence layout and masks, KV-cache equality, image-input modes, training and
resume, caption parsing, bad inputs, and the CLI contract on the bundled model (CPU, small)."""
import math
import json
from pathlib import Path

import pytest
import torch

from unitok.mllm.config import MLLMConfig
from unitok.mllm.model import UnifiedModel
from unitok.mllm.sequence import SPECIALS
from unitok.mllm.text import TextTokenizer
from unitok.data.scene_text import (QUESTION_TYPES, canonical_caption, eval_questions, make_question, parse_caption,
                                    text_corpus)
from unitok.mllm.tasks import SceneSet, encode_scenes
from unitok.mllm.trainer import MLLMTrainer, MLLMTrainConfig, apply_mllm_overrides
from unitok.tokenizer.model import UniTok

ROOT = Path(__file__).resolve().parents[2]
TOKENIZER = ROOT / "data" / "tiny-shapes"
BUNDLED = ROOT / "data" / "tiny-mllm"
SMALL = dict(width=32, depth=2, num_heads=2, depth_width=32, depth_layers=1, depth_heads=2, caption_tokens=12,
             question_tokens=10, target_tokens=24)


@pytest.fixture(scope="module")
def tok(small_tokenizer):
    return small_tokenizer


@pytest.fixture(scope="module")
def scenes(tok, tmp_path_factory):
    return encode_scenes(tok, "test", 24, max_objects=2, progress=False, features="latent",
                         cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def text(scenes):
    return TextTokenizer.train(text_corpus(scenes.records), num_merges=200)


def small_model(tok, text, **kw):
    torch.manual_seed(0)
    model = UnifiedModel(MLLMConfig.for_tokenizer(tok, text, **{**SMALL, **kw}), tok, text)
    with torch.no_grad():  # a non-zero image classifier, so that sampled codes depend on the context
        if model.config.can_generate:
            model.image_head.classifier.weight.normal_(0, 0.5)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- text
def test_text_tokenizer_round_trip_and_byte_fallback(text):
    s = "a large red star at the top left, on a black background"
    ids = text.encode(s)
    assert text.decode(ids) == s
    assert len(ids) < len(s) / 3                       # whole words are single tokens
    odd = "Zebra QUIZ ünïcode 42?!"
    assert text.decode(text.encode(odd)) == TextTokenizer.normalize(odd)   # unknown text falls back to bytes
    assert min(text.encode(odd)) >= len(SPECIALS)       # text never produces a special id
    again = TextTokenizer.from_json(json.loads(json.dumps(text.to_json())))
    assert again.encode(s) == ids and len(again) == len(text)


def test_captions_questions_and_parsing(scenes):
    for rec in scenes.records:
        got = parse_caption(canonical_caption(rec))
        colour, shape, size, position = rec["objects"][0]
        assert (got["colour"], got["shape"], got["size"], got["position"]) == (colour, shape, size, position)
        assert got["count"] == len(rec["objects"])
        qs = eval_questions(rec)
        answers = [a for t, _, a in qs if t == "yesno"]
        assert sorted(answers) == ["no", "yes"]         # balanced
    assert parse_caption("a small purple heart in the top right corner and a small cross")["position"] == "top right"
    rec = {"objects": [("red", "circle", "small", "left")], "background": "black", "caption": ""}
    import random
    rng = random.Random(0)
    for _ in range(50):   # training negatives never name a held-out pair
        q, a = make_question(rec, "yesno", rng, answer_yes=False)
        assert a == "no" and "red star" not in q and "red diamond" not in q
    with pytest.raises(ValueError, match="question type"):
        make_question(rec, "smell")
    assert set(QUESTION_TYPES) >= {"colour", "shape", "position", "count", "yesno"}


# ---------------------------------------------------------------------------------------------------- layout
def test_sequence_layout_and_loss_covers_only_the_target(tok, text, scenes):
    model = small_model(tok, text)
    cfg = model.config
    img = scenes.codes[0].long()
    items = [{"task": "t2i", "image": img, "caption": "a red circle"},
             {"task": "i2t", "image": img, "caption": "a blue star at the top"},
             {"task": "vqa", "image": img, "question": "what colour is it?", "answer": "blue"}]
    b = model.build_batch(items)
    sp = {s: i for i, s in enumerate(SPECIALS)}
    t2i, i2t, vqa = b["tokens"]
    assert t2i[0] == sp["<t2i>"] and t2i[cfg.image_start("t2i") - 1] == sp["<boi>"]
    assert i2t[:2].tolist() == [sp["<i2t>"], sp["<boi>"]] and i2t[2 + cfg.num_positions] == sp["<eoi>"]
    assert vqa[cfg.prompt_length("vqa") - 1] == sp["<sep>"]
    # targets: nothing for t2i text; exactly caption/answer + <eos> for the others, predicted by the slot before
    tgt = b["text_targets"]
    assert (tgt[0] != -100).sum() == 0
    cap = text.encode("a blue star at the top") + [sp["<eos>"]]
    assert tgt[1][tgt[1] != -100].tolist() == cap
    first = cfg.prompt_length("i2t") - 1
    assert tgt[1, first] == cap[0] and b["tokens"][1, first + 1] == cap[0]
    assert tgt[2][tgt[2] != -100].tolist() == text.encode("blue") + [sp["<eos>"]]
    assert b["image_target"].tolist() == [True, False, False]
    # the loss is the mean CE over exactly those slots (and the image sub-codes of the t2i item)
    out = model(b)
    logp = out.text_logits.float().log_softmax(-1)
    mask = tgt != -100
    nll = -logp.gather(2, tgt.clamp(min=0)[..., None])[..., 0]
    manual = (nll[1][mask[1]].mean() + nll[2][mask[2]].mean()) / 2      # each text task weighs the same
    assert torch.allclose(out.text_loss, manual, atol=1e-5)
    assert out.text_tokens == int(mask.sum()) and out.image_subcodes == cfg.num_positions * cfg.num_codebooks
    # changing a non-target slot's would-be target changes nothing
    b2 = dict(b, text_targets=tgt.clone())
    assert torch.allclose(model(b2).loss, out.loss)


@pytest.mark.parametrize("mode", ["codebook", "embedding"])
def test_no_image_token_attends_to_a_later_one(tok, text, scenes, mode):
    model = small_model(tok, text, image_input=mode)
    cfg = model.config
    img = scenes.codes[0].long()
    items = [{"task": "t2i", "image": img, "caption": "a red circle"}]
    b = model.build_batch(items)
    changed = img.clone()
    t = 20
    changed[t + 1:] = (changed[t + 1:] + 7) % cfg.codebook_size    # every image token after position t
    b2 = dict(b, image=changed[None])
    start = cfg.image_start("t2i")
    out1, out2 = model(b), model(b2)
    # positions 0..t, and the first sub-code of t+1 (the depth head then sees t+1's own sub-codes), come from
    # slots up to start+t: unchanged; later ones do change
    assert torch.allclose(out1.image_logits[:, :t + 1], out2.image_logits[:, :t + 1], atol=1e-5)
    assert torch.allclose(out1.image_logits[:, t + 1, 0], out2.image_logits[:, t + 1, 0], atol=1e-5)
    assert not torch.allclose(out1.image_logits[:, t + 2:], out2.image_logits[:, t + 2:], atol=1e-5)
    e1 = model.embed_sequence(b["tokens"], b["image"], b["image_start"])
    e2 = model.embed_sequence(b["tokens"], changed[None], b["image_start"])
    assert torch.equal(e1[:, :start + t + 1], e2[:, :start + t + 1])


# ---------------------------------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("mode", ["codebook", "embedding", "continuous"])
def test_kv_cache_equals_recomputation(tok, text, scenes, mode):
    model = small_model(tok, text, image_input=mode)
    img = scenes.features[:3].float() if mode == "continuous" else scenes.codes[:3].long()
    for task, qs in (("i2t", None), ("vqa", ["what colour is it?", "how many shapes?", "where is it?"])):
        a = list(model.text_steps(task, img, qs, max_new_tokens=6, temperature=1.5, seed=4, use_cache=True))
        b = list(model.text_steps(task, img, qs, max_new_tokens=6, temperature=1.5, seed=4, use_cache=False))
        assert len(a) == len(b) == 6
        for x, y in zip(a, b):
            assert torch.equal(x.ids, y.ids)
            assert torch.allclose(x.probs, y.probs, atol=1e-5)
    if mode == "continuous":
        with pytest.raises(ValueError, match="cannot write"):
            model.generate(["a red star"])
        return
    # guided (the unconditional branch rides in the same batch) with every filter on
    kw = dict(num=1, temperature=1.0, top_k=50, top_p=0.95, cfg_scale=3.0, seed=7)
    c1 = model.generate(["a red circle", "a blue star"], use_cache=True, **kw)
    c2 = model.generate(["a red circle", "a blue star"], use_cache=False, **kw)
    assert c1.shape == (2, 8, 8, 8) and torch.equal(c1, c2)
    assert not torch.equal(c1[0], c1[1])
    # best of 3: the candidate of the same seed's 3 draws that the tokenizer matches best to its prompt
    best = model.generate(["a red circle", "a blue star"], use_cache=True, rerank=3, **kw)
    pool = model.generate(["a red circle", "a blue star"], use_cache=True, **{**kw, "num": 3})
    with torch.no_grad():
        text = tok.encode_text(["a red circle", "a blue star"])
        score = (tok.code_features(pool).view(2, 3, -1) * text[:, None]).sum(-1)
    assert torch.equal(best, pool.view(2, 3, 8, 8, 8)[torch.arange(2), score.argmax(1)])


def test_three_image_input_modes(tok, text, scenes):
    pics = torch.zeros(2, 3, 32, 32)
    for mode, source, width in (("codebook", "latent", 8), ("embedding", "latent", 8), ("continuous", "latent", 32),
                                ("continuous", "encoder", 128)):
        model = small_model(tok, text, image_input=mode, continuous_source=source)
        feats = model.image_features(pics)
        assert feats.shape[:2] == (2, 64) and feats.shape[-1] == width
        assert feats.is_floating_point() == (mode == "continuous")
        emb = model.embed_image(feats)
        assert emb.shape == (2, 64, model.config.width)
        caps = model.caption(pics, max_new_tokens=3)     # pictures are encoded on the fly
        assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    cb = small_model(tok, text, image_input="codebook")
    # the codebook copy is the tokenizer's unit-norm codebook; post_quant_proj starts from the tokenizer's weights
    assert torch.allclose(cb.codebooks, tok.quantizer.normalized_codebooks())
    for (k1, v1), (k2, v2) in zip(cb.post_quant_proj.state_dict().items(), tok.post_quant_proj.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    assert cb.post_quant_proj.attn.causal


# ---------------------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs(tok, text, scenes):
    model = small_model(tok, text)
    img = scenes.codes[:1].long()
    with pytest.raises(ValueError, match="at most 10"):
        model.answer(img, ["what colour is the shape in this very long and winding question about it?"])
    with pytest.raises(ValueError, match="non-empty question"):
        model.answer(img, ["  "])
    with pytest.raises(ValueError, match="one question per image"):
        model.answer(scenes.codes[:2].long(), ["a?", "b?", "c?"])
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 256\)"):
        model.caption(img + 1000)
    with pytest.raises(ValueError, match=r"expected codes \(B, 64, 8\)"):
        model.caption(img[:, :10])
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(["a red star"], temperature=0)
    with pytest.raises(ValueError, match="at least one prompt"):
        model.generate([])
    with pytest.raises(ValueError, match="num must be"):
        model.generate(["a red star"], num=0)
    with pytest.raises(ValueError, match="rerank must be an int >= 1"):
        model.generate(["a red star"], rerank=0)
    with pytest.raises(ValueError, match="image_input must be one of"):
        MLLMConfig(image_input="pixels")
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        apply_mllm_overrides(model.config, MLLMTrainConfig(), ["colour=red"])
    with pytest.raises(ValueError, match="t2i_weight=0"):
        apply_mllm_overrides(model.config, MLLMTrainConfig(), ["image_input=continuous"])
    with pytest.raises(ValueError, match="does not match"):
        UnifiedModel(MLLMConfig.for_tokenizer(tok, text, grid_size=4), tok, text)


# ---------------------------------------------------------------------------------------------------- training
def _trainer(tok, text, scenes, out, resume=False, steps=4):
    cfg, train = apply_mllm_overrides(MLLMConfig.for_tokenizer(tok, text, **SMALL), MLLMTrainConfig(),
                                      [f"steps={steps}", "batch_size=6", "checkpoint_every=2", "eval_every=0",
                                       "cpu_bf16=off"])
    return MLLMTrainer(cfg, train, tok, text, scenes, {"test": SceneSet(scenes.codes[:4], scenes.records[:4],
                                                                          split="test")},
                       out_dir=out, resume=resume)


def test_training_learns_and_resumes_exactly(tok, text, scenes, tmp_path):
    full = _trainer(tok, text, scenes, tmp_path / "full")
    full.run(progress=False)
    assert full.step_count == 4 and full.history[-1]["loss"] < full.history[0]["loss"]
    assert {"text_loss", "image_loss", "matmul_gflops"} <= set(full.history[0])
    full.close()
    part = _trainer(tok, text, scenes, tmp_path / "part", steps=4)
    part.run(2, progress=False)
    part.save_checkpoint()
    part.close()
    again = _trainer(tok, text, scenes, tmp_path / "part", resume=True)
    assert again.step_count == 2
    again.run(progress=False)
    for (k, a), (_, b) in zip(full.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    res = again.evaluate(max_images=2)
    assert 0.0 <= res["vqa_acc_test"] <= 1.0 and res["text_nll_test"] > 0 and res["image_nll_test"] > 0
    summary = again.write_summary(res)
    again.close()
    saved = UnifiedModel.from_pretrained(tmp_path / "part" / "final", tokenizer=tok)
    assert saved.text.encode("a red star") == text.encode("a red star")
    assert torch.equal(saved.state_dict()["text_embed.weight"], again.model.state_dict()["text_embed.weight"])
    assert json.loads((tmp_path / "part" / "summary.json").read_text())["steps"] == summary["steps"] == 4


# ---------------------------------------------------------------------------------------------------- CLI
needs_bundled = pytest.mark.skipif(not (BUNDLED / "model.safetensors").exists(),
                                   reason="the bundled unified model (data/tiny-mllm) is not there")


def _picture(path, size=48, mode="RGB"):
    from PIL import Image
    img = Image.new("RGB", (size, size), (20, 20, 20))
    for x in range(size // 4, 3 * size // 4):
        for y in range(size // 4, 3 * size // 4):
            img.putpixel((x, y), (235, 45, 45))
    img.convert(mode).save(path)
    return path


@pytest.mark.slow   # six CLI processes (import torch, load two models): ~25 s quiet, minutes on a busy CPU
@needs_bundled
def test_cli_contract_on_the_bundled_model(tmp_path, start_cli):
    a = _picture(tmp_path / "a.png")
    b = _picture(tmp_path / "b.png", 32, "L")
    junk = tmp_path / "junk.png"
    junk.write_text("not a picture")
    grid = _picture(tmp_path / "grid.png", 64)              # what `unitok generate --out x.png` writes: a grid
    (tmp_path / "pictures").mkdir()
    runs = {
        "caption": start_cli("caption", a, b),
        "ask": start_cli("ask", a, "--question", "what colour is the shape?"),
        "generate": start_cli("generate", "--mllm", "--prompt", "a red star", "--num", "2", "--out",
                              tmp_path / "star.png", "--seed", "1"),
        "junk": start_cli("caption", junk),
        "missing": start_cli("ask", tmp_path / "nope.png", "--question", "what shape is it?"),
        "bad_dir": start_cli("caption", a, "--mllm", tmp_path),
        "folder": start_cli("caption", tmp_path / "pictures"),
        "grid": start_cli("caption", grid),
    }
    res = {k: wait() for k, wait in runs.items()}
    cap = res["caption"]
    assert cap.returncode == 0, cap.stderr
    lines = [json.loads(line) for line in cap.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(a), str(b)] and all(line["caption"] for line in lines)
    assert "converted to 32x32 RGB" in cap.stderr           # one notice per converted picture
    ask = res["ask"]
    assert ask.returncode == 0, ask.stderr
    (answer,) = [json.loads(line) for line in ask.stdout.splitlines()]
    assert answer["question"] == "what colour is the shape?" and answer["answer"]
    gen = res["generate"]                                   # the generator's command and output contract
    assert gen.returncode == 0, gen.stderr
    assert "wrote 2 samples for prompt 'a red star'" in gen.stdout and (tmp_path / "star.png").exists()
    assert res["grid"].returncode == 0 and "a grid of 2x2 pictures of 32 px?" in res["grid"].stderr
    for key, pattern in (("junk", "junk.png is not a picture"), ("missing", "nope.png not found"),
                         ("bad_dir", "holds no unified model"), ("folder", "pictures is a folder; expected a picture")):
        r = res[key]
        assert r.returncode == 2 and pattern in r.stderr and "Traceback" not in r.stderr, (key, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------------- widget
def test_unified_chat_widget(tok, text, scenes, tmp_path):
    from unitok_widgets import UnifiedChat

    model = small_model(tok, text)
    pics = torch.rand(3, 3, 32, 32) * 2 - 1
    chat = UnifiedChat(model, pics, index=1)
    assert chat.codes.shape == (8, 8, 8) and chat.picture_image.value
    answer, details = chat.ask("what shape is it?")
    assert isinstance(answer, str) and all(0.0 <= p <= 1.0 for _, p in details)
    shown = chat.answer_html.value
    assert f"(p = {math.prod(p for _, p in details):.2f})" in shown and "outside them" not in shown
    chat.ask("is there a dog in the picture?")             # never trained on: its answer is called a guess
    assert "outside them, so the answer is a guess" in chat.answer_html.value
    chat.index.value = 2
    assert torch.equal(chat.picture, pics[2])
    codes = chat.draw("a blue heart")
    assert codes.shape == (8, 8, 8) and chat.drawing_image.value
    _picture(tmp_path / "up.png", 40, "L")
    chat.show_upload((tmp_path / "up.png").read_bytes(), "up.png")
    assert "40x40 L shown as 32x32 RGB" in chat.status.value
    chat.show_upload(b"not a picture", "junk.png")
    assert "junk.png is not a picture" in chat.status.value
    chat.ask("what colour is the shape in this very long and winding question about it?")
    assert "at most" in chat.status.value                 # a bad question is a message, not a crash
    assert chat.static_figure() is not None
    chat.close()
    assert chat.closed


@pytest.mark.slow
@pytest.mark.notebook
@needs_bundled
def test_notebook_10_runs_in_smoke_mode(subprocess_env):
    import nbclient
    import nbformat

    nb = nbformat.read(ROOT / "notebooks" / "10_one_model_both_directions.ipynb", as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")      # stored without outputs
    nb.cells.append(nbformat.v4.new_code_cell(
        "assert trainer.step_count == STEPS and len(trainer.history) == STEPS\n"
        "assert 0.0 <= results['vqa_acc'] <= 1.0 and results['image_nll'] > 0\n"
        "assert len(captions) == 8 and all(isinstance(c, str) for c in captions)\n"
        "assert samples.shape[1:] == (8, 8, 8) and chat.last_answer is not None\n"
        "from unitok.studies.roadmap import ROADMAP\n"
        "vqa = {r['setting']: r for r in roadmap_rows if r['metric'] == 'mllm_vqa_acc'}\n"
        "assert list(vqa) == list(ROADMAP) and all(r['n'] == 3 for r in vqa.values())\n"
        "print('checks passed')"))
    import os
    saved = {k: os.environ.get(k) for k in ("UNITOK_SMOKE", "OMP_NUM_THREADS")}
    os.environ.update(UNITOK_SMOKE="1", OMP_NUM_THREADS="1")
    try:
        nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
    assert "checks passed" in "".join(o.get("text", "") for o in nb.cells[-1].outputs)


# ---------------------------------------------------------------------------------------------------- roadmap
def test_roadmap_study_plans_six_arms_on_five_tokenizers():
    from unitok.studies.plan import parse_studies, plan
    from unitok.studies.spec import Scale
    from unitok.studies.roadmap import ROADMAP

    assert "roadmap" not in parse_studies("all") and parse_studies("codebooks,roadmap") == ["codebooks", "roadmap"]
    tasks = plan("roadmap", 1, Scale())
    assert [t.setting for t in tasks] == list(ROADMAP)            # the paper's order
    assert all(t.spec["kind"] == "mllm" for t in tasks)
    keys = [t.spec["tokenizer_key"] for t in tasks]
    assert keys[0] == keys[1] and len(set(keys)) == 5              # clip and +factorization share a tokenizer
    tok = {t.setting: t.spec["tokenizer"]["model"] for t in tasks}
    assert tok["+discretization"]["num_codebooks"] == 1 and tok["+discretization"]["codebook_size"] == 2048
    assert tok["clip"]["l2_weight"] == 0.0 and tok["+reconstruction"]["l2_weight"] > 0
    assert tok["+multi-codebook"]["projection"] == "linear" and tok["+attention projection"]["projection"] == "attn"
    assert tasks[0].spec["mllm"] == {"image_input": "continuous", "continuous_source": "encoder"}


def test_roadmap_results_are_tabulated_and_drawn_next_to_the_papers_numbers(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    from unitok.studies.report import format_table, summarize
    from unitok.studies.roadmap import ROADMAP, plot_roadmap

    records = [{"study": "roadmap", "setting": name, "seed": seed, "run": f"{name}-{seed}",
                "metrics": {"mllm_vqa_acc": 0.4 + 0.01 * i + 0.02 * seed, "mllm_caption_acc": 0.5}}
               for i, name in enumerate(ROADMAP) for seed in range(2)]
    rows = summarize(records)
    table = format_table(rows)
    assert "unified model VQA accuracy, seen pairs" in table
    assert "| +attention projection | 0.460 ± 0.014 (2) | 0.500 ± 0.000 (2) |" in table
    fig = plot_roadmap(rows, png=tmp_path / "roadmap.png")
    ours, paper = fig.axes
    assert [round(v, 1) for v in paper.lines[0].get_ydata()] == [v[2] for v in ROADMAP.values()]
    assert (tmp_path / "roadmap.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="no roadmap results"):
        plot_roadmap(summarize([{**records[0], "study": "codebooks"}]))


def test_model_steps_set_the_unified_models_training_but_not_the_tokenizers(tmp_path):
    from unitok.studies.plan import plan
    from unitok.studies.runner import run_ablation
    from unitok.studies.spec import Scale

    short, long = plan("roadmap", 1, Scale()), plan("roadmap", 1, Scale(generator_steps=800))
    assert [t.spec["steps"] for t in long] == [800] * 6 and [t.spec["steps"] for t in short] == [200] * 6
    assert [t.spec["tokenizer_key"] for t in long] == [t.spec["tokenizer_key"] for t in short]   # reused
    assert long[0].key != short[0].key
    with pytest.raises(ValueError, match="--model-steps must be >= 1"):
        run_ablation("roadmap", seeds=1, model_steps=0, out=tmp_path / "abl")


def test_question_type_knows_every_trained_question_and_nothing_else():
    from unitok.data.scene_text import question_type, scene_record
    from unitok.data.shapes_dataset import ShapesDataset

    data = ShapesDataset(32, "train", length=40)
    asked = [(qtype, q) for i in range(40) for qtype, q, _ in eval_questions(scene_record(data.scene(i)))]
    assert len({qtype for qtype, _ in asked}) == len(QUESTION_TYPES)
    assert all(question_type(q) == qtype for qtype, q in asked), [a for a in asked if question_type(a[1]) != a[0]]
    assert question_type("  What SHAPE is it? ") == "shape"
    for outside in ("is there a dog in the picture?", "why is the heart purple?", "is there a red dog?", "hello"):
        assert question_type(outside) is None, outside
