"""The token generator: causality, cached == recomputed sampling, guidance, the depth head's distribution, training,
exact resume, input checks, and the `generate` command (CPU, seconds)."""
from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from unitok.data.shapes_dataset import ShapesDataset
from unitok.generator.config import GeneratorConfig
from unitok.generator.model import TokenGenerator
from unitok.checkpoint import tokenizer_hash
from unitok.transformer.sampling import guided_logits, keep_best_aligned
from unitok.evaluation.generator_scores import pair_prompts
from unitok.generator.codes import blank_plain_codes, extract_codes, plain_colour_mask
from unitok.generator.noise import code_neighbours, corrupt_codes, mix_own_draws, self_feed_share
from unitok.generator.trainer import GeneratorTrainConfig, GeneratorTrainer, apply_generator_overrides

ROOT = Path(__file__).resolve().parents[2]
SMALL = dict(width=32, depth=2, num_heads=2, depth_width=32, depth_layers=1, depth_heads=2)


@pytest.fixture(scope="module")
def tokenizer(small_tokenizer):
    return small_tokenizer


def _randomise_head(gen: TokenGenerator) -> TokenGenerator:
    # the classifier starts at zero (uniform predictions); random weights make every test below non-trivial
    torch.manual_seed(1)
    for p in gen.classifier.parameters():
        torch.nn.init.normal_(p, std=0.5)
    if gen.classifier.geometry and not gen.classifier.code_vectors.any():   # no tokenizer: random unit codes
        gen.classifier.set_codebooks(torch.nn.functional.normalize(torch.randn_like(gen.classifier.code_vectors), dim=-1))
    return gen.eval()


def _class_gen(head="depth", grid=3, k=3, K=3, **extra) -> TokenGenerator:
    cfg = GeneratorConfig(grid_size=grid, num_codebooks=k, codebook_size=K, condition="class", num_classes=4,
                          head=head, **{**SMALL, **extra})
    torch.manual_seed(0)
    return _randomise_head(TokenGenerator(cfg))


@pytest.fixture(scope="module")
def text_gen(tokenizer):
    torch.manual_seed(0)
    cfg = GeneratorConfig.preset("tiny", tokenizer=tokenizer, **SMALL)
    return _randomise_head(TokenGenerator(cfg, tokenizer))


# ------------------------------------------------------------------------------------------------ the model
@pytest.mark.parametrize("head, everywhere", [("depth", False), ("parallel", False), ("depth", True)])
def test_changing_position_t_never_changes_earlier_logits(head, everywhere):
    gen = _class_gen(head, grid=4, k=3, K=5, condition_at_every_position=everywhere)
    torch.manual_seed(2)
    codes = torch.randint(0, 5, (2, 4, 4, 3))
    labels = torch.tensor([0, 3])
    base = gen(codes, labels).logits                         # (B, N, k, K)
    t = 6
    changed = codes.clone().view(2, 16, 3)
    changed[:, t] = (changed[:, t] + 1) % 5
    after = gen(changed.view(2, 4, 4, 3), labels).logits
    assert torch.equal(base[:, :t + 1, 0], after[:, :t + 1, 0]) or torch.allclose(base[:, :t + 1, 0],
                                                                                     after[:, :t + 1, 0], atol=1e-6)
    assert torch.allclose(base[:, :t], after[:, :t], atol=1e-6)      # every earlier position, every sub-code
    assert not torch.allclose(base[:, t + 1:], after[:, t + 1:])     # later positions do see it
    if head == "depth":
        # within position t, sub-code i's logits depend only on sub-codes < i
        only_last = codes.clone().view(2, 16, 3)
        only_last[:, t, 2] = (only_last[:, t, 2] + 1) % 5
        inner = gen(only_last.view(2, 4, 4, 3), labels).logits
        assert torch.allclose(base[:, t], inner[:, t], atol=1e-6)
        only_first = codes.clone().view(2, 16, 3)
        only_first[:, t, 0] = (only_first[:, t, 0] + 1) % 5
        inner = gen(only_first.view(2, 4, 4, 3), labels).logits
        assert torch.allclose(base[:, t, 0], inner[:, t, 0], atol=1e-6)
        assert not torch.allclose(base[:, t, 1:], inner[:, t, 1:])


@pytest.mark.parametrize("head", ["depth", "parallel"])
def test_probabilities_over_all_k_tuples_of_a_position_sum_to_one(head):
    gen = _class_gen(head, grid=3, k=3, K=3)
    torch.manual_seed(3)
    context = torch.randint(0, 3, (1, 9, 3))
    t = 4
    tuples = torch.tensor(list(itertools.product(range(3), repeat=3)))        # all 27 k-tuples
    codes = context.repeat(len(tuples), 1, 1)
    codes[:, t] = tuples
    logp = gen(codes.view(-1, 3, 3, 3), torch.full((len(tuples),), 2)).logits.log_softmax(-1)  # (27, N, k, K)
    joint = logp[:, t].gather(-1, tuples[:, :, None])[..., 0].sum(-1)                 # log p(c1, c2, c3)
    assert joint.exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    assert (joint.exp() > 1e-3).sum() >= 3   # a real distribution over tuples, not a point mass


def test_classifier_starts_at_zero_so_the_first_loss_is_ln_K(tokenizer):
    gen = TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tokenizer, **SMALL), tokenizer)
    codes = tokenizer.encode(torch.zeros(2, 3, 32, 32))
    assert gen(codes, prompts=["a red star", "a blue circle"]).loss.item() == pytest.approx(np.log(256), abs=1e-5)


@pytest.mark.parametrize("head", ["depth", "parallel"])
def test_codebook_logits_score_codes_by_their_direction_in_the_tokenizers_codebook(tokenizer, head):
    from unitok.transformer.code_head import CodeClassifier

    cfg = GeneratorConfig.preset("tiny", tokenizer=tokenizer, head=head, **SMALL)
    assert cfg.code_logits == "codebook"
    gen = TokenGenerator(cfg, tokenizer)
    books = tokenizer.quantizer.normalized_codebooks()                             # (k, K, d)
    assert torch.equal(gen.classifier.code_vectors, books)
    assert not gen.classifier.query.any() and not gen.classifier.weight.any()      # starts uniform (ln K loss)
    # a query that points at code 7 of sub-codebook 2: logits = cosine to code 7, best for 7, then its neighbours
    head_ = CodeClassifier(4, books.shape[0], books.shape[1], books.shape[2], shared=True, geometry=True)
    head_.set_codebooks(books)
    with torch.no_grad():
        head_.query[2] = torch.eye(4)
    x = books[2, 7][None]                                                          # (1, in_dim=4)
    logits = head_(x, index=2)[0]
    assert logits.argmax() == 7 and logits[7].item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(logits, books[2] @ books[2, 7], atol=1e-5)
    shared = head_(x[:, None].expand(1, books.shape[0], 4))                        # (1, k, K): row j vs book j
    assert torch.allclose(shared[0, 2], logits, atol=1e-6)
    assert not CodeClassifier(4, 8, 16, 4, shared=True, geometry=False)(torch.randn(3, 8, 4)).any()


def test_generators_saved_before_an_option_load_as_they_were_trained(tmp_path):
    # a folder written before code_logits and condition_at_every_position existed: the plain classifier and the
    # prefix-only condition, whatever today's defaults are
    torch.manual_seed(0)
    old = GeneratorConfig(**{**SMALL, "grid_size": 2, "num_codebooks": 2, "codebook_size": 4, "condition": "class",
                             "num_classes": 2, "code_logits": "linear", "condition_at_every_position": False})
    TokenGenerator(old).save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    for name in ("code_logits", "condition_at_every_position"):
        del meta["generator"][name]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    gen = TokenGenerator.from_pretrained(tmp_path)
    assert gen.config.code_logits == "linear" and not gen.classifier.geometry
    assert gen.config.condition_at_every_position is False and not hasattr(gen, "condition_to_positions")
    assert GeneratorConfig().condition_at_every_position and GeneratorConfig().code_logits == "codebook"


# ------------------------------------------------------------------------------------------------ sampling
@pytest.mark.parametrize("head, image_input, everywhere", [("depth", "embedding", False),
                                                           ("parallel", "embedding", False),
                                                           ("depth", "codebook", False), ("depth", "embedding", True)])
def test_kv_cache_sampling_equals_full_recompute(head, image_input, everywhere, tokenizer):
    torch.manual_seed(0)
    gen = _randomise_head(TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tokenizer, head=head,
                                                                image_input=image_input, **SMALL,
                                                                condition_at_every_position=everywhere), tokenizer))
    kw = dict(prompts=["a red star", "a green circle"], num=2, temperature=0.9, top_k=40, top_p=0.95,
              cfg_scale=2.5, seed=5)
    cached = gen.generate(**kw)
    recomputed = gen.generate(**kw, use_cache=False)
    assert cached.shape == (4, 8, 8, 8)
    assert torch.equal(cached, recomputed)
    steps_c = list(gen.sample_steps(gen.text_states(["a red star"]), temperature=0.8, seed=1))
    steps_r = list(gen.sample_steps(gen.text_states(["a red star"]), temperature=0.8, seed=1, use_cache=False))
    for a, b in zip(steps_c, steps_r):
        assert torch.equal(a.codes, b.codes)
        assert torch.allclose(a.probs, b.probs, atol=1e-5) and torch.allclose(a.entropy, b.entropy, atol=1e-4)


def test_codebook_input_starts_from_the_tokenizer_and_stays_causal(tokenizer):
    torch.manual_seed(0)
    cfg = GeneratorConfig.preset("tiny", tokenizer=tokenizer, image_input="codebook", **SMALL)
    gen = _randomise_head(TokenGenerator(cfg, tokenizer))
    assert not hasattr(gen, "code_embed")
    torch.testing.assert_close(gen.codebooks, tokenizer.quantizer.normalized_codebooks())
    for name, value in tokenizer.post_quant_proj.state_dict().items():
        torch.testing.assert_close(gen.post_quant_proj.state_dict()[name], value)
    torch.manual_seed(3)
    codes = torch.randint(0, cfg.codebook_size, (2, 8, 8, 8))
    embedded = gen.embed_codes(codes.view(2, 64, 8))
    changed = codes.clone().view(2, 64, 8)
    changed[:, 20] = (changed[:, 20] + 1) % cfg.codebook_size
    after = gen.embed_codes(changed)
    assert torch.allclose(embedded[:, :20], after[:, :20], atol=1e-6)       # earlier inputs never see position 20
    assert not torch.allclose(embedded[:, 20:], after[:, 20:])
    # a saved generator's own copies are what it uses after loading, with no tokenizer at construction
    reloaded = TokenGenerator(cfg)
    reloaded.load_state_dict(gen.state_dict())
    torch.testing.assert_close(reloaded.eval().embed_codes(codes.view(2, 64, 8)), embedded)


def test_codebook_initialised_tables_keep_the_codebooks_geometry(tokenizer):
    torch.manual_seed(0)
    cfg = GeneratorConfig.preset("tiny", tokenizer=tokenizer, embed_init="codebook", **SMALL)
    gen = TokenGenerator(cfg, tokenizer)
    books = tokenizer.quantizer.normalized_codebooks()                         # (k, K, d)
    K = cfg.codebook_size
    table = gen.code_embed.weight[:K]                                          # sub-codebook 0's rows
    cos_codes = (books[0] @ books[0].T).flatten()
    cos_rows = torch.nn.functional.normalize(table, dim=-1) @ torch.nn.functional.normalize(table, dim=-1).T
    assert torch.corrcoef(torch.stack([cos_codes, cos_rows.flatten()]))[0, 1] > 0.8
    torch.manual_seed(0)
    plain = TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tokenizer, embed_init="random", **SMALL),
                           tokenizer).code_embed.weight[:K]
    cos_plain = torch.nn.functional.normalize(plain, dim=-1) @ torch.nn.functional.normalize(plain, dim=-1).T
    assert abs(torch.corrcoef(torch.stack([cos_codes, cos_plain.flatten()]))[0, 1]) < 0.2


def test_sampling_is_deterministic_for_a_seed_and_varies_across_seeds(text_gen):
    a = text_gen.generate(prompts="a blue square", num=3, seed=11)
    b = text_gen.generate(prompts="a blue square", num=3, seed=11)
    c = text_gen.generate(prompts="a blue square", num=3, seed=12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({x.numpy().tobytes() for x in a}) == 3          # distinct samples within a batch


def test_cfg_scale_one_is_the_conditional_model_and_zero_the_unconditional(text_gen):
    c, u = torch.randn(4, 256), torch.randn(4, 256)
    assert torch.equal(guided_logits(c, u, 1.0), c)
    assert torch.allclose(guided_logits(c, u, 3.0), u + 3 * (c - u))
    # scale 1 mixes in nothing: the conditional model's samples
    conditional = text_gen.generate(prompts="a red star", num=3, seed=4, cfg_scale=1.0)
    states = text_gen.text_states(["a red star"]).repeat(3, 1, 1)
    codes = torch.zeros(3, 8, 8, 8, dtype=torch.long)
    for _ in text_gen.sample_steps(states, seed=4, codes=codes):
        pass
    assert torch.equal(conditional, codes)
    # scale 0 keeps only the unconditional branch: the same draws as an unconditional model
    guided_zero = text_gen.generate(prompts="a red star", num=3, seed=4, cfg_scale=0.0)
    unconditional = text_gen.generate(num=3, seed=4)
    assert torch.equal(guided_zero, unconditional)


def test_complete_keeps_the_first_positions_and_resample_changes_one(text_gen):
    codes = text_gen.generate(prompts="a red star", num=2, seed=0)
    done = text_gen.complete(codes, first_n=20, prompts="a red star", seed=9, temperature=1.5)
    flat_a, flat_b = codes.view(2, 64, 8), done.view(2, 64, 8)
    assert torch.equal(flat_a[:, :20], flat_b[:, :20]) and not torch.equal(flat_a[:, 20:], flat_b[:, 20:])
    other = text_gen.resample_position(codes, 3, 5, prompts="a red star", seed=3, temperature=2.0)
    diff = (other != codes).any(-1)                                   # (B, H, W)
    assert diff.sum() >= 1 and diff[:, 3, 5].all() and diff.sum() == diff[:, 3, 5].sum()
    maps = text_gen.position_maps(codes, prompts="a red star")
    assert maps["entropy"].shape == (2, 8, 8) and (maps["entropy"] >= 0).all() and (maps["nll"] > 0).all()


def test_code_features_are_the_tokenizers_image_feature_of_those_codes(tokenizer):
    images = ShapesDataset(32, split="test", length=6)
    x = torch.stack([images[i]["image"] for i in range(6)])
    with torch.no_grad():
        assert torch.allclose(tokenizer.code_features(tokenizer.encode(x)), tokenizer.encode_image(x), atol=1e-6)
    with pytest.raises(ValueError, match="codes must have shape"):
        tokenizer.code_features(torch.zeros(2, 64, 8, dtype=torch.long))


def test_rerank_keeps_the_candidate_the_tokenizer_matches_best_to_the_prompt(text_gen):
    tok = text_gen.tokenizer
    prompts = ["a red star", "a blue circle"]
    picked = text_gen.generate(prompts=prompts, num=2, seed=5, rerank=3)
    assert picked.shape == (4, 8, 8, 8)
    pool = text_gen.generate(prompts=prompts, num=6, seed=5).view(2, 2, 3, 8, 8, 8)   # (prompt, sample, draw)
    with torch.no_grad():
        text = tok.encode_text(prompts)
        score = torch.einsum("psde,pe->psd", tok.code_features(pool.flatten(0, 2)).view(2, 2, 3, -1), text)
    best = pool.flatten(0, 1)[torch.arange(4), score.flatten(0, 1).argmax(1)]
    assert torch.equal(picked, best)
    # the kept draw scores at least as well as the plain first draw of each sample, and strictly better somewhere
    first = score[..., 0].flatten()
    kept = score.flatten(0, 1).max(1).values
    assert (kept >= first).all() and (kept > first).any()
    assert torch.equal(text_gen.generate(prompts=prompts, num=2, seed=5, rerank=1),
                       text_gen.generate(prompts=prompts, num=2, seed=5))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="rerank must be an int >= 1"):
            text_gen.generate(prompts=prompts, num=2, rerank=bad)
    with pytest.raises(ValueError, match="rerank needs prompts or labels"):
        text_gen.generate(num=2, rerank=2)
    with pytest.raises(ValueError, match="candidates"):
        keep_best_aligned(tok, pool.flatten(0, 2)[:5], prompts, 2)


def test_self_feed_mixes_in_the_models_own_draws_by_position_with_a_ramp(tokenizer):
    cfg = GeneratorTrainConfig(steps=100, self_feed=0.4, self_feed_ramp=0.5)
    assert [self_feed_share(s, cfg) for s in (0, 25, 50, 99)] == [0.0, 0.2, 0.4, 0.4]
    assert self_feed_share(0, GeneratorTrainConfig(steps=100, self_feed=0.4, self_feed_ramp=0.0)) == 0.4
    torch.manual_seed(0)
    B, N, k, K = 64, 16, 3, 5
    codes = torch.randint(K, (B, 4, 4, k))
    # logits that put all mass on (code + 1) % K: a drawn position differs from the true one in every sub-code
    target = (codes.view(B, N, k) + 1) % K
    logits = torch.full((B, N, k, K), -1e4).scatter(-1, target[..., None], 0.0)
    assert torch.equal(mix_own_draws(logits, codes, 0.0), codes)
    mixed = mix_own_draws(logits, codes, 0.3).view(B, N, k)
    drawn = (mixed != codes.view(B, N, k))                                 # (B, N, k)
    assert torch.equal(drawn.all(-1), drawn.any(-1))                       # whole positions, never single sub-codes
    assert torch.equal(mixed[drawn], target[drawn])                        # and what is drawn comes from the logits
    assert 0.25 < drawn.all(-1).float().mean() < 0.35
    with pytest.raises(ValueError, match="self_feed must lie in"):
        GeneratorTrainConfig(self_feed=1.0)
    with pytest.raises(ValueError, match="self_feed_ramp must lie in"):
        GeneratorTrainConfig(self_feed_ramp=1.5)


# ------------------------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_errors_naming_what_was_expected(text_gen):
    g = text_gen
    good = torch.zeros(1, 8, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        g.check_codes(good + 256)
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        g.check_codes(good - 1)
    with pytest.raises(ValueError, match="8 sub-codes"):
        g.check_codes(torch.zeros(1, 8, 8, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(B, 8, 8, 8\)"):
        g.check_codes(torch.zeros(1, 4, 4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="integer codes"):
        g.check_codes(good.float())
    with pytest.raises(ValueError, match="non-empty prompt"):
        g.generate(prompts="  ")
    with pytest.raises(ValueError, match="at least one prompt"):
        g.generate(prompts=[])
    with pytest.raises(ValueError, match="expected prompts"):
        g.generate(labels=[1])
    with pytest.raises(ValueError, match="temperature"):
        g.generate(prompts="a red star", temperature=0)
    with pytest.raises(ValueError, match="top_p"):
        g.generate(prompts="a red star", top_p=0)
    with pytest.raises(ValueError, match="grid"):
        g.resample_position(good, 8, 0, prompts="a red star")
    with pytest.raises(ValueError, match="8 sub-codes"):
        g.complete(torch.zeros(1, 8, 8, 3, dtype=torch.long), 4, prompts="a red star")
    cls = _class_gen()
    with pytest.raises(ValueError, match=r"unknown class 7: expected a label in \[0, 4\)"):
        cls.generate(labels=[7])
    with pytest.raises(ValueError, match=r"unknown class -1"):
        cls.generate(labels=[-1])
    with pytest.raises(ValueError, match="names no class"):
        cls.generate(prompts="a red star")
    with pytest.raises(ValueError, match="head must be one of"):
        GeneratorConfig(head="wide")
    with pytest.raises(ValueError, match="unknown setting 'widht'"):
        apply_generator_overrides(GeneratorConfig(), __import__("unitok.generator.trainer").generator.trainer
                                  .GeneratorTrainConfig(), ["widht=3"])


def test_class_generator_maps_prompts_naming_a_class():
    cfg = GeneratorConfig(grid_size=2, num_codebooks=2, codebook_size=4, condition="class", num_classes=2,
                          class_names=["red star", "blue circle"], **SMALL)
    gen = TokenGenerator(cfg)
    assert gen.labels_from_prompts(["a blue circle", "A red star."]).tolist() == [1, 0]


# ------------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def code_cache(tmp_path_factory, tokenizer):
    return tmp_path_factory.mktemp("codes")


def _trainer(tokenizer, cache, out_dir=None, resume=False, steps=40, train_extra=(), **extra):
    digest = tokenizer_hash(tokenizer)
    codes = extract_codes(tokenizer, "shapes", "train", 384, 0, cache_dir=cache, progress=False, digest=digest)
    test = extract_codes(tokenizer, "shapes", "test", 64, 0, cache_dir=cache, progress=False, digest=digest)
    gen = GeneratorConfig.preset("tiny", tokenizer=tokenizer, **{**SMALL, **extra})
    gen, train = apply_generator_overrides(gen, __import__("unitok.generator.trainer").generator.trainer
                                           .GeneratorTrainConfig(), [f"steps={steps}", "batch_size=16",
                                                                    "eval_every=0", "checkpoint_every=0",
                                                                    "lr=3e-3", "warmup_fraction=0.1",
                                                                    "cpu_bf16=off", *train_extra])
    return GeneratorTrainer(gen, train, tokenizer, codes, {"test": test}, out_dir=out_dir, resume=resume,
                            tokenizer_path=ROOT / "data" / "tiny-shapes")


def test_generator_captions_name_every_colour_and_keep_the_pictures(tokenizer, code_cache):
    digest = tokenizer_hash(tokenizer)
    named = extract_codes(tokenizer, "shapes", "train", 48, 0, cache_dir=code_cache, progress=False, digest=digest)
    mixed = extract_codes(tokenizer, "shapes", "train", 48, 0, cache_dir=code_cache, progress=False, digest=digest,
                          p_no_colour=0.5)                      # the tokenizer's captions
    colours = ShapesDataset.COLOURS
    assert all(any(c in caption.split() for c in colours) for caption in named.captions)
    assert sum(not any(c in caption.split() for c in colours) for caption in mixed.captions) >= 12
    assert torch.equal(named.codes, mixed.codes)               # same pictures: only the captions differ
    assert named.info["cache"] != mixed.info["cache"]


def test_plain_colour_mask_finds_the_plain_background_and_its_colour():
    from unitok.data.shapes import render_scene

    bg = np.array([0.3, -0.2, 0.5], np.float32)
    image = torch.from_numpy(render_scene([], bg, 32))
    image[:, 5:11, 9:14] = torch.tensor([0.9, 0.9, -0.9])[:, None, None]   # an object over patches (1-2, 2-3)
    image[:, 16:20, 0:4] += 0.1 * torch.rand(3, 4, 4)                        # a textured, not plain, patch (4, 0)
    mask, colour = plain_colour_mask(image[None], patch=4)
    expected = torch.ones(8, 8, dtype=torch.bool)
    expected[1:3, 2:4] = False
    expected[4, 0] = False
    assert torch.equal(mask[0], expected)
    assert torch.allclose(colour[0], torch.from_numpy(bg))
    noise = torch.rand(1, 3, 32, 32)                                         # nothing plain: nothing is background
    assert not plain_colour_mask(noise, patch=4)[0].any()


def test_blank_plain_codes_replace_background_tokens_only(tokenizer, code_cache):
    ds = ShapesDataset(32, "test", length=6, seed=0, max_objects=1)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    codes = tokenizer.encode(images)
    clean = blank_plain_codes(tokenizer, images, codes, "background")
    mask, colour = plain_colour_mask(images, patch=4)
    blank = tokenizer.encode(colour[..., None, None].expand_as(images).contiguous())
    assert torch.equal(clean[mask], blank[mask])           # background: the blank picture's codes
    assert torch.equal(clean[~mask], codes[~mask])         # the object's tokens are untouched
    assert (clean[mask] != codes[mask]).any(-1).float().mean() > 0.5   # and most background tokens did change
    # the decoded object survives: the pixels of the object's patches barely move
    keep = ~mask[:, None].repeat_interleave(4, 2).repeat_interleave(4, 3).expand_as(images)
    a, b = tokenizer.decode(codes), tokenizer.decode(clean)
    assert (a - b)[keep].abs().mean() < 0.05
    digest = tokenizer_hash(tokenizer)
    plain = extract_codes(tokenizer, "shapes", "test", 16, 0, cache_dir=code_cache, progress=False, digest=digest)
    cleaned = extract_codes(tokenizer, "shapes", "test", 16, 0, cache_dir=code_cache, progress=False, digest=digest,
                            plain_codes="background")
    assert plain.info["cache"] != cleaned.info["cache"]
    assert not torch.equal(plain.codes, cleaned.codes) and plain.captions == cleaned.captions
    # "plain" goes on to the object's flat interior (its own colour, not the background's); "tokenizer" is a no-op
    every = blank_plain_codes(tokenizer, images, codes, "plain")
    inner, inner_colour = plain_colour_mask(images, patch=4, among=~mask)
    assert inner.any() and torch.equal(every[mask], clean[mask]) and torch.equal(every[~mask & ~inner],
                                                                                  codes[~mask & ~inner])
    interior = tokenizer.encode(inner_colour[..., None, None].expand_as(images).contiguous())
    assert torch.equal(every[inner], interior[inner])
    assert torch.equal(blank_plain_codes(tokenizer, images, codes, "tokenizer"), codes)
    with pytest.raises(ValueError, match="plain_codes must be one of"):
        blank_plain_codes(tokenizer, images, codes, "flat")


def test_runs_saved_before_an_option_resume_as_they_were_trained():
    saved = {k: v for k, v in dataclasses.asdict(GeneratorTrainConfig()).items()
             if k not in ("p_no_colour", "plain_codes")}
    old = GeneratorTrainConfig.from_saved(saved)
    assert old.p_no_colour == 0.5 and old.plain_codes == "tokenizer"
    assert GeneratorTrainConfig().plain_codes == "background"          # today's default
    assert GeneratorTrainConfig.from_saved(dataclasses.asdict(GeneratorTrainConfig())) == GeneratorTrainConfig()
    with pytest.raises(ValueError, match="plain_codes must be one of"):
        GeneratorTrainConfig(plain_codes="flat")


def test_code_cache_is_reused_and_keyed_by_the_tokenizer_hash(tokenizer, code_cache):
    digest = tokenizer_hash(tokenizer)
    a = extract_codes(tokenizer, "shapes", "test", 64, 0, cache_dir=code_cache, progress=False, digest=digest)
    b = extract_codes(tokenizer, "shapes", "test", 64, 0, cache_dir=code_cache, progress=False, digest=digest)
    assert a.info["cache"] == b.info["cache"] and digest[:16] in a.info["cache"]
    assert torch.equal(a.codes, b.codes) and a.codes.shape == (64, 8, 8, 8)
    fresh = tokenizer.encode(torch.stack([__import__("unitok.data.shapes_dataset").data.shapes_dataset.ShapesDataset(32, "test", length=64,
                                                                                        max_objects=1)[i]["image"]
                                          for i in range(4)]))
    assert torch.equal(a.codes[:4].long(), fresh)
    other = "0" * 64   # another tokenizer's weights: another file, never the stale one
    c = extract_codes(tokenizer, "shapes", "test", 8, 0, cache_dir=code_cache, progress=False, digest=other)
    assert c.info["cache"] != a.info["cache"]


def test_short_training_lowers_held_out_nll(tokenizer, code_cache):
    trainer = _trainer(tokenizer, code_cache, steps=40)
    before = trainer.evaluate()["bits_per_subcode_test"]
    assert before == pytest.approx(8.0, abs=1e-3)        # zero-initialised classifier: uniform over 256 codes
    trainer.run(progress=False)
    after = trainer.evaluate()["bits_per_subcode_test"]
    assert after < before - 0.1, (before, after)
    assert len(trainer.history) == 40 and all(np.isfinite(h["loss"]) for h in trainer.history)


def test_code_noise_swaps_input_sub_codes_for_their_nearest_codes_and_keeps_the_targets(tokenizer):
    books = tokenizer.quantizer.normalized_codebooks().detach()          # (k, K, d)
    neighbours = code_neighbours(books, 4)
    k, K = books.shape[:2]
    sim = books @ books.transpose(1, 2)
    fourth = sim.sort(-1, descending=True).values[..., 4]                 # 5th incl. itself = 4th other code
    for j in (0, k - 1):
        picked = sim[j].gather(1, neighbours[j])                          # (K, 4) cosine to the chosen codes
        assert (neighbours[j] != torch.arange(K)[:, None]).all()          # never the code itself
        assert (picked >= fourth[j][:, None] - 1e-6).all()                # the 4 nearest others
    torch.manual_seed(0)
    codes = torch.randint(K, (64, 8, 8, k))
    assert torch.equal(corrupt_codes(codes, neighbours, 0.0), codes)
    noisy = corrupt_codes(codes, neighbours, 0.3)
    changed = noisy != codes
    assert 0.27 < changed.float().mean() < 0.33
    book = torch.arange(k).expand(codes.shape)
    near = (neighbours[book, codes] == noisy[..., None]).any(-1)         # each change is one of the 4 nearest
    assert near[changed].all()
    with pytest.raises(ValueError, match="code_noise must lie in"):
        __import__("unitok.generator.trainer").generator.trainer.GeneratorTrainConfig(code_noise=1.0)
    with pytest.raises(ValueError, match="code_noise_neighbours must lie in"):
        code_neighbours(books, K)

    gen = _randomise_head(TokenGenerator(GeneratorConfig.preset("tiny", tokenizer=tokenizer, **SMALL), tokenizer))
    x = codes[:2, :, :, :gen.config.num_codebooks] % gen.config.codebook_size
    plain, same = gen(x), gen(x, input_codes=x)
    assert torch.equal(plain.logits, same.logits)
    other = gen(x, input_codes=corrupt_codes(x, neighbours, 0.5))
    flat = other.logits.view(2, 64, -1, gen.config.codebook_size)
    assert torch.equal(flat[:, 0], plain.logits.view_as(flat)[:, 0])     # position 0 reads no codes
    assert not torch.allclose(flat[:, 1:], plain.logits.view_as(flat)[:, 1:])


def test_resume_is_exact(tokenizer, code_cache, tmp_path):
    # the input corruption and the model's own draws come from the RNG the checkpoint carries
    noisy = ["code_noise=0.3", "self_feed=0.5", "self_feed_ramp=0"]
    full = _trainer(tokenizer, code_cache, out_dir=tmp_path / "a", steps=6, train_extra=noisy)
    full.run(3, progress=False)
    full.save_checkpoint()
    shutil.copytree(tmp_path / "a", tmp_path / "b", ignore=shutil.ignore_patterns(".lock"))
    full.run(3, progress=False)
    full.close()
    resumed = _trainer(tokenizer, code_cache, out_dir=tmp_path / "b", resume=True, steps=6, train_extra=noisy)
    assert resumed.step_count == 3
    resumed.run(progress=False)
    resumed.close()
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    for (name, a), (_, b) in zip(full.generator.state_dict().items(), resumed.generator.state_dict().items()):
        assert torch.equal(a, b), name
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_a_run_folder_is_not_overwritten(tokenizer, code_cache, tmp_path):
    t = _trainer(tokenizer, code_cache, out_dir=tmp_path / "run", steps=2)
    t.run(progress=False)
    t.save_checkpoint()
    t.close()
    with pytest.raises(ValueError, match="resume|overwrite"):
        _trainer(tokenizer, code_cache, out_dir=tmp_path / "run", steps=2)


def test_saved_generator_loads_with_its_tokenizer_and_samples_the_same(text_gen, tmp_path):
    text_gen.save_pretrained(tmp_path / "g", tokenizer_path=ROOT / "data" / "tiny-shapes")
    loaded = TokenGenerator.from_pretrained(tmp_path / "g")
    a = text_gen.generate(prompts="a cyan heart", num=2, seed=1)
    assert torch.equal(a, loaded.generate(prompts="a cyan heart", num=2, seed=1))
    assert loaded.decode(a).shape == (2, 3, 32, 32)


def test_pair_prompts_split_seen_and_held_out():
    seen, held = pair_prompts(False), pair_prompts(True)
    assert len(seen) == 53 and len(held) == 11
    assert ("a red star", 0, 4) in held and all(p not in [s for s, _, _ in seen] for p, _, _ in held)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.mark.skipif(not (ROOT / "data" / "tiny-generator" / "model.safetensors").exists(),
                    reason="the bundled generator is recreated by `make generator`")
def test_generate_cli_with_the_bundled_generator(run_cli, tmp_path, capsys):
    run_cli("generate", "--prompt", "a green circle", "--num", "3", "--seed", "0", "--out", tmp_path / "x.npz")
    with np.load(tmp_path / "x.npz") as f:
        assert f["images"].shape == (3, 32, 32, 3) and f["images"].dtype == np.uint8
        assert f["codes"].shape == (3, 8, 8, 8) and f["codes"].dtype == np.int64
    run_cli("generate", "--prompt", "a green circle", "--num", "3", "--seed", "0", "--out", tmp_path / "y.npz")
    with np.load(tmp_path / "x.npz") as a, np.load(tmp_path / "y.npz") as b:
        assert np.array_equal(a["codes"], b["codes"])
    run_cli("generate", "--prompt", "a green circle", "--num", "2", "--out", tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 100
    from unitok.cli import main   # bad input in-process: the same code path without a start-up per case
    from PIL import Image

    pics = tmp_path / "pics"    # a folder: the grid and one PNG a sample (the same pictures as the .npz)
    assert main(["generate", "--prompt", "a green circle", "--num", "3", "--seed", "0", "--out", str(pics)]) == 0
    assert sorted(p.name for p in pics.iterdir()) == ["grid.png", "sample_000.png", "sample_001.png", "sample_002.png"]
    with np.load(tmp_path / "x.npz") as f:
        assert np.array_equal(np.asarray(Image.open(pics / "sample_001.png")), f["images"][1])
    capsys.readouterr()
    assert main(["generate", "--prompt", "a green circle", "--out", str(pics)]) == 2   # never overwritten
    assert "not empty" in capsys.readouterr().err and len(list(pics.iterdir())) == 4

    for args, message in ((["--prompt", ""], "non-empty"), (["--class", "3"], "--class"),
                          (["--prompt", "a red star", "--rerank", "0"], "--rerank must be >= 1")):
        assert main(["generate", *args, "--out", str(tmp_path / "z.npz")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "z.npz").exists()
    ranked = run_cli("generate", "--prompt", "a green circle", "--num", "2", "--rerank", "3", "--out",
                     tmp_path / "r.npz")
    assert "rerank=3" in ranked.stdout
    with np.load(tmp_path / "r.npz") as r:
        assert r["codes"].shape == (2, 8, 8, 8)


@pytest.mark.skipif(not (ROOT / "data" / "tiny-generator" / "model.safetensors").exists(),
                    reason="the bundled generator is recreated by `make generator`")
def test_evaluate_generator_cli_scores_the_bundled_generator(run_cli, tmp_path, capsys):
    from unitok.cli import main

    quick = ["--num", "2", "--no-fid", "--classifier-steps", "20", "--sampling", "cfg_scale=2"]
    run_cli("evaluate-generator", *quick, "--rerank", "2", "--out", tmp_path / "m.json")
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["sampling"]["cfg_scale"] == 2.0 and m["sampling"]["rerank"] == 2 and m["sampling"]["top_k"] == 4
    assert m["samples"] == 2 * 53 and m["samples_heldout"] == 2 * 11 and "fid_proxy" not in m
    assert all(0.0 <= m[k] <= 1.0 for k in ("prompt_colour_acc", "prompt_shape_acc", "prompt_both_acc",
                                            "distinct_fraction", "code_usage"))
    assert m["prompt_colour_acc"] > 0.5   # the bundle draws the prompted colour (chance: 1 in 8)
    for args, message in ((["--rerank", "0"], "--rerank must be >= 1"), (["--num", "0"], "--num must be >= 1"),
                          (["--sampling", "bogus=1"], "expected KEY=VALUE"),
                          (["--sampling", "cfg_scale=x"], "expected cfg_scale=<float>"),
                          (["--out", str(tmp_path / "m.txt")], "--out must end in .json"),
                          (["--generator", str(tmp_path)], "holds no generator")):
        assert main(["evaluate-generator", *args]) == 2                 # in-process: the same code path, no start-up
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "m.txt").exists()


@pytest.mark.skipif(not (ROOT / "data" / "tiny-generator" / "model.safetensors").exists(),
                    reason="the bundled generator is recreated by `make generator`")
def test_export_records_recommended_sampling_and_keeps_the_summary(tmp_path):
    from unitok.cli.generator import export_generator, parse_sampling, recommended_sampling

    src = ROOT / "data" / "tiny-generator"
    dest = export_generator(src, tmp_path / "g", sampling=parse_sampling(["top_k=4", "cfg_scale=2.5"]))
    measured = json.loads((src / "summary.json").read_text())["sampling"]
    assert recommended_sampling(dest) == {"temperature": measured["temperature"], "top_p": measured["top_p"],
                                          "top_k": 4, "cfg_scale": 2.5}
    assert json.loads((dest / "summary.json").read_text()) == json.loads((src / "summary.json").read_text())
    # without --sampling the folder recommends what its summary was measured with
    plain = export_generator(src, tmp_path / "h")
    assert recommended_sampling(plain) == {k: measured[k] for k in ("temperature", "top_k", "top_p", "cfg_scale")}
    for bad, expected in (("top_k", "KEY=VALUE"), ("beam=3", "KEY=VALUE"), ("top_k=four", "top_k=<int>")):
        with pytest.raises(ValueError, match=expected):
            parse_sampling([bad])
    with pytest.raises(ValueError, match="top_k must be an int >= 0"):
        export_generator(src, tmp_path / "k", sampling={"top_k": -1})
    assert not (tmp_path / "k").exists()
