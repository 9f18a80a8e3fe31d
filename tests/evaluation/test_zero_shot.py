"""Tests for unitok.evaluation.zero_shot: zero-shot classification and retrieval with a fake model (CPU, deterministic)."""
import unitok.torchvision_fix as _tv

_tv.apply()  # before torchmetrics/timm/open_clip import torchvision

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from unitok.evaluation import zero_shot as ZS  # noqa: E402


# ---------------------------------------------------------------------------------------------------------------
# Zero-shot classification and retrieval
# ---------------------------------------------------------------------------------------------------------------

CLASSES = ["cat", "dog", "bird"]
TEMPLATES = ["a photo of a {}.", "a drawing of a {}."]


class FakeModel(nn.Module):
    """Text features: one-hot of the class word (dims 0..2) plus +-0.5 on dim 3 depending on the template, so the
    template-averaged classifier is exactly one-hot. encode_text takes no `normalize` argument, on purpose."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def tokenize(self, texts):
        ids = []
        for t in texts:
            cls = next(i for i, c in enumerate(CLASSES) if c in t.split()[-1])
            ids.append([cls, 0 if t.startswith("a photo") else 1])
        return torch.tensor(ids, dtype=torch.long)

    def encode_text(self, tokens):
        f = F.one_hot(tokens[:, 0], 4).float()
        f[:, 3] = torch.where(tokens[:, 1] == 0, 0.5, -0.5)
        return F.normalize(f, dim=-1)

    def encode_image(self, images):
        return F.normalize(images.flatten(1), dim=-1)


def test_zero_shot_classifier_and_accuracy():
    model = FakeModel().train()
    clf = ZS.zero_shot_classifier(model, CLASSES, TEMPLATES)
    assert model.training                                     # restored after eval mode for the build
    assert clf.shape == (4, 3)
    assert torch.allclose(clf, torch.eye(4)[:, :3], atol=1e-6)
    feats = F.normalize(torch.tensor([[1.0, 0.1, 0, 0],      # cat, right
                                      [0.2, 1.0, 0, 0],      # dog, right
                                      [0.0, 0.5, 1, 0],      # bird, right
                                      [0.9, 1.0, 0, 0]]), dim=-1)   # labelled cat, predicted dog, cat second
    acc = ZS.zero_shot_accuracy(feats, torch.tensor([0, 1, 2, 0]), clf, topk=(1, 2, 5))
    assert acc == {"top1": 0.75, "top2": 1.0, "num_images": 4}    # top5 skipped: only 3 classes


def test_retrieval_recall_hand_made_and_duplicates():
    img = torch.eye(4)
    r = ZS.retrieval_recall(img, img.clone(), ks=(1, 5))
    assert r == {"image_to_text_R@1": 1.0, "text_to_image_R@1": 1.0, "num_pairs": 4}   # @5 > N skipped
    txt = torch.eye(4)[[0, 1, 3, 2]]                          # texts 2 and 3 swapped
    r = ZS.retrieval_recall(img, txt, ks=(1, 4))
    assert r["image_to_text_R@1"] == 0.5 and r["text_to_image_R@1"] == 0.5
    assert r["image_to_text_R@4"] == 1.0 and r["text_to_image_R@4"] == 1.0
    # if the swapped pairs have identical captions, retrieving either copy is correct
    r = ZS.retrieval_recall(img, txt, ks=(1,), captions=["a", "b", "c", "c"])
    assert r["image_to_text_R@1"] == 1.0 and r["text_to_image_R@1"] == 1.0


def test_retrieval_recall_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(50, 8, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(50, 8, generator=g), dim=-1)
    r = ZS.retrieval_recall(img, txt, ks=(1, 5, 10), chunk_size=7)    # chunking must not matter
    sim = img @ txt.T
    rank_i2t = (sim > sim.diagonal()[:, None]).sum(1)          # texts scoring above the true one
    rank_t2i = (sim.T > sim.diagonal()[:, None]).sum(1)
    for k in (1, 5, 10):
        assert r[f"image_to_text_R@{k}"] == pytest.approx(float((rank_i2t < k).float().mean()))
        assert r[f"text_to_image_R@{k}"] == pytest.approx(float((rank_t2i < k).float().mean()))
