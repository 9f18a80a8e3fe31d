"""The linear probe (unitok.evaluation.linear_probe) and its place in evaluate_model."""
import copy
import dataclasses

import numpy as np
import pytest
import torch

from unitok import UniTok, get_preset
from unitok.data.datasets import build_datasets
from unitok.evaluation.tokenizer import evaluate_model
from unitok.evaluation.linear_probe import linear_probe, pooled_token_features

SMALL = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, latent_dim=16, num_codebooks=4,
             codebook_size=32, text_width=32, text_layers=1, text_heads=2, context_length=16)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return UniTok(dataclasses.replace(get_preset("tiny").model, **SMALL)).eval()


def test_probe_reads_a_linearly_separable_label_and_not_noise():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 4
    y_train, y_test = rng.integers(0, 4, 400), rng.integers(0, 4, 200)
    x_train = centres[y_train] + rng.normal(size=(400, 16))
    x_test = centres[y_test] + rng.normal(size=(200, 16))
    r = linear_probe(x_train, y_train, x_test, y_test)
    assert r["top1"] == 1.0 and r["train_top1"] == 1.0
    assert (r["num_train"], r["num_test"], r["num_classes"]) == (400, 200, 4)
    # labels unrelated to the features: the probe can do no better than chance on new data
    noise = linear_probe(rng.normal(size=(400, 16)), y_train, rng.normal(size=(200, 16)), y_test)
    assert noise["top1"] < 0.4
    # tensors work too, and the result is deterministic
    again = linear_probe(torch.as_tensor(x_train), torch.as_tensor(y_train), torch.as_tensor(x_test),
                         torch.as_tensor(y_test))
    assert again == r


@pytest.mark.parametrize("args, match", [
    ((np.zeros((4, 3)), np.array([0, 1, 0]), np.zeros((2, 3)), np.array([0, 1])), "disagree"),
    ((np.zeros((4, 3)), np.array([0, 1, 0, 1]), np.zeros((2, 5)), np.array([0, 1])), "differ in size"),
    ((np.zeros((4, 3)), np.zeros(4, int), np.zeros((2, 3)), np.array([0, 0])), "at least two classes"),
    ((np.zeros(4), np.array([0, 1, 0, 1]), np.zeros((2, 3)), np.array([0, 1])), "2 dimension"),
])
def test_probe_refuses_mismatched_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        linear_probe(*args)


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_token_features_pool_the_up_projected_codes_as_the_image_head_does(model, pool):
    model = copy.deepcopy(model)
    model.config = dataclasses.replace(model.config, image_pool=pool)
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    feats = pooled_token_features(model, images)
    assert feats.shape == (3, model.config.width)
    codes = model.encode(images).flatten(1, 2)
    tokens = model.post_quant_proj(model.quantizer.lookup(codes))
    torch.testing.assert_close(feats, tokens.mean(1) if pool == "mean" else tokens.max(1).values)


def test_evaluate_reports_the_probe_next_to_zero_shot(model):
    _, evals = build_datasets({"name": "shapes", "eval_images": 32}, 32)
    assert len(evals["probe_train"]) == 64 and evals["probe_train"].split == "train"
    assert evals["probe_train"].max_objects == 1
    results = evaluate_model(model, {k: evals[k] for k in ("zero_shot", "zero_shot_heldout", "probe_train")})
    for task in ("shape", "colour", "colour_shape"):
        assert 0.0 <= results[f"linear_probe_{task}_top1"] <= 1.0
    assert results["linear_probe_top1"] == results["linear_probe_shape_top1"]
    assert 0.0 <= results["linear_probe_top1_heldout"] <= 1.0
    assert (results["linear_probe_train_images"], results["linear_probe_test_images"]) == (64, 32)
    # the probe set is not an evaluation image: a different split from the zero-shot test set
    assert not torch.equal(evals["probe_train"][0]["image"], evals["zero_shot"][0]["image"])
