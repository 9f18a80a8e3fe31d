"""What makes the understanding half learn: the image head's blocks, captions that leave colours out, and one
hard negative per image (the caption with its shape swapped)."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from unitok import UniTok, get_preset
from unitok.data.shapes_dataset import ShapesDataset
from unitok.training.losses import UniTokLoss, hard_negative_loss
from unitok.training.tokenizer_trainer import Trainer
from unitok.training.trainer import StepBatchSampler

SMALL = dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, latent_dim=16, num_codebooks=4,
             codebook_size=32, text_width=32, text_layers=1, text_heads=2, context_length=16)


def test_image_head_blocks_change_only_the_image_feature():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny").model, **SMALL, image_head_depth=0)
    plain = UniTok(cfg).eval()
    torch.manual_seed(0)
    headed = UniTok(dataclasses.replace(cfg, image_head_depth=1)).eval()
    assert "image_blocks" not in dict(plain.named_children())               # the reference's state dict, unchanged
    assert len(headed.image_blocks) == 1 and headed.num_parameters(by_part=True)["image_blocks"] > 0
    headed.load_state_dict({**headed.state_dict(), **plain.state_dict()})    # same weights everywhere else
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(headed.reconstruct(images), plain.reconstruct(images))
    f = headed.encode_image(images)
    assert f.shape == (2, cfg.embed_dim) and torch.allclose(f.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(f, plain.encode_image(images))
    with pytest.raises(ValueError, match="image_head_depth"):
        dataclasses.replace(cfg, image_head_depth=-1)


def test_max_pooling_changes_only_the_image_feature_and_adds_no_weights():
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny").model, **SMALL, image_pool="mean")
    mean_model = UniTok(cfg).eval()
    max_model = UniTok(dataclasses.replace(cfg, image_pool="max")).eval()
    max_model.load_state_dict(mean_model.state_dict())                      # same keys and shapes: strict load
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(max_model.reconstruct(images), mean_model.reconstruct(images))
    tokens = torch.randn(2, cfg.num_tokens, cfg.width)
    tokens[0, 5, :] = 50.0                                                  # one strong token dominates the max
    expected = F.normalize(max_model.projection(max_model.fc_norm(
        max_model.image_blocks(tokens).max(1).values)), dim=-1)
    torch.testing.assert_close(max_model.image_head(tokens), expected)
    assert not torch.allclose(max_model.image_head(tokens), mean_model.image_head(tokens))
    with pytest.raises(ValueError, match="image_pool"):
        dataclasses.replace(cfg, image_pool="sum")


def test_a_saved_config_without_image_pool_loads_as_the_mean():
    from unitok.tokenizer.config import ModelConfig, from_dict

    values = dataclasses.asdict(dataclasses.replace(get_preset("tiny").model, **SMALL))
    del values["image_pool"]
    assert from_dict(ModelConfig, values).image_pool == "mean"              # older bundled models compute the same
    assert get_preset("tiny").model.image_pool == "max"


def test_some_captions_name_the_shape_without_its_colour():
    ds = ShapesDataset(32, length=400)
    without = 0
    for i in range(len(ds)):
        scene = ds.scene(i)
        caption = scene["caption"]
        for obj in scene["objects"]:
            assert obj["shape"] in caption                                   # every caption names every shape
        without += not any(o["colour"] in caption.split() for o in scene["objects"])
    assert 0.4 < without / len(ds) < 0.6                                     # P_NO_COLOUR = 0.5


def test_negative_caption_swaps_only_the_primary_shape():
    ds = ShapesDataset(32, length=300)
    for i in range(len(ds)):
        item, scene = ds[i], ds.scene(i)
        shape = scene["objects"][0]["shape"]
        pos, neg = item["caption"].split(), item["negative_caption"].split()
        diff = [(a.strip(","), b.strip(",")) for a, b in zip(pos, neg) if a != b]
        assert len(pos) == len(neg) and len(diff) == 1, (item["caption"], item["negative_caption"])
        assert diff[0][0] == shape and diff[0][1] in ds.SHAPES and diff[0][1] != shape
        assert ds[i]["negative_caption"] == item["negative_caption"]          # deterministic per index
    assert len({ds[i]["negative_caption"].split()[-1] for i in range(50)}) > 1


def test_hard_negative_loss_is_a_two_way_softmax():
    torch.manual_seed(0)
    img, pos, neg = (F.normalize(torch.randn(5, 8), dim=-1) for _ in range(3))
    scale = torch.tensor(10.0)
    expected = torch.stack([-torch.log_softmax(scale * torch.stack([img[i] @ pos[i], img[i] @ neg[i]]), 0)[0]
                            for i in range(5)]).mean()
    torch.testing.assert_close(hard_negative_loss(img, pos, neg, scale), expected)
    assert hard_negative_loss(img, img, -img, scale) < 1e-6                   # the right caption, far apart
    assert math.isclose(float(hard_negative_loss(img, pos, pos, scale)), math.log(2), rel_tol=1e-6)


def test_trainer_appends_the_hard_negatives_and_the_loss_weighs_them():
    overrides = [f"{k}={v}" for k, v in SMALL.items()] + ["batch_size=4", "eval_every=0", "checkpoint_every=0",
                                                          "hard_negative_weight=0.5"]
    trainer = Trainer.from_preset("tiny", data="shapes", overrides=overrides)
    seen = []
    original = trainer.model.tokenize      # the trainer tokenizes the captions before the forward pass
    trainer.model.tokenize = lambda texts: (seen.append(list(texts)), original(texts))[1]
    metrics = trainer.step()
    indices = StepBatchSampler(len(trainer.train_data), 4, trainer.config.seed).indices_for_step(0)
    items = [trainer.train_data[i] for i in indices]
    assert seen[0] == [it["caption"] for it in items] + [it["negative_caption"] for it in items]
    weighted = (0.2 * metrics["l1"] + metrics["l2"] + metrics["vq"] + metrics["clip"]
                + 0.5 * metrics["hard_negative"])
    assert math.isclose(metrics["loss"], weighted, rel_tol=1e-5)
    off = Trainer.from_preset("tiny", data="shapes", overrides=overrides[:-1] + ["hard_negative_weight=0"])
    assert "hard_negative" not in off.step()
