"""The full objective: LPIPS, the DINOv2-feature discriminator, the adaptive GAN weight, the delayed start, exact
resume with the discriminator's state, and the refusal to train without the loss networks' weights.

Random backbones throughout ("random"): nothing is downloaded. The discriminator reads 28 px images (2 x 2 DINOv2
patches) so it costs little; what is checked is the bookkeeping and the formulas, not GAN quality.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import UniTok, get_preset
from unitok.training import discriminator as D
from unitok.tokenizer.config import TrainConfig
from unitok.training.losses import UniTokLoss
from unitok.training.tokenizer_trainer import Trainer

SMALL_GAN = ["width=64", "encoder_depth=1", "decoder_depth=1", "num_heads=2", "latent_dim=16", "num_codebooks=4",
             "codebook_size=64", "clip_weight=0", "batch_size=2", "eval_every=0", "log_every=1",
             "gan_weight=1", "dino_weights=random", "disc_image_size=28"]


def _gan_trainer(extra=(), **kwargs) -> Trainer:
    return Trainer.from_preset("tiny", data="shapes", overrides=[*SMALL_GAN, *extra], **kwargs)


@pytest.fixture(scope="module")
def adversarial():
    cfg = dataclasses.replace(get_preset("tiny").model, gan_weight=1.0, gan_start=0.0, gan_warmup=0.0)
    train = TrainConfig(dino_weights="random", disc_image_size=28)
    return D.AdversarialLoss(cfg, train, torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return UniTok(dataclasses.replace(get_preset("tiny").model, width=64, encoder_depth=1, decoder_depth=1,
                                      num_heads=2, latent_dim=16, num_codebooks=4, codebook_size=64))


def _images(n=2, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ---------------------------------------------------------------------------------------------------------------
def test_gan_ramp_starts_at_37_5_percent_with_a_linear_warmup():
    ramp = [D.gan_ramp(s, 1000, 0.375, 0.01) for s in range(370, 390)]
    assert ramp[:5] == [0.0] * 5                                  # steps 370..374: off
    assert ramp[5] == pytest.approx(0.1) and ramp[9] == pytest.approx(0.5)   # 375: 1/10 of the way, 379: half
    assert ramp[14:] == [1.0] * 6                                 # 384 onwards: full weight
    assert D.gan_ramp(0, 10, 0.0, 0.0) == 1.0
    cfg = get_preset("base").model
    assert (cfg.gan_start, cfg.gan_weight, cfg.lpips_weight, cfg.disc_cr_weight) == (0.375, 1.0, 1.0, 4.0)
    assert (get_preset("tiny").model.gan_weight, get_preset("tiny").model.lpips_weight) == (0.0, 0.0)
    assert (TrainConfig().disc_lr, TrainConfig().disc_betas) == (2e-5, (0.5, 0.9))


def test_adaptive_weight_is_the_formula_and_is_clamped():
    torch.manual_seed(0)
    last = torch.nn.Parameter(torch.randn(3, 4))
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    nll, gan = (last * a).sum() ** 2, (last * b).sum()
    g_nll, g_gan = 2 * (last * a).sum() * a, b                    # the gradients, by hand
    expected = 0.4 * g_nll.norm() / (g_gan.norm() + 1e-4)
    got = D.adaptive_weight(nll, gan, last)
    torch.testing.assert_close(got, expected.detach())
    assert not got.requires_grad
    assert D.adaptive_weight(nll, gan * 1e-9, last, maximum=3.0) == 3.0   # clamped


def test_generator_terms_add_the_weighted_gan_term(adversarial, tiny_model):
    images = _images()
    out = tiny_model(images)
    terms = UniTokLoss(tiny_model.config)(out, images)
    last = tiny_model.last_decoder_layer
    adversarial.disc.eval()  # no spectral-norm power iteration: two calls compute the same D
    state = adversarial.generator.get_state()
    new = adversarial.generator_terms(terms, out.reconstruction, last, step=5, total_steps=10)
    g_loss = -adversarial.disc(out.reconstruction, generator=torch.Generator().set_state(state)).mean()  # same draw
    nll = 0.2 * terms["l1"] + 1.0 * terms["l2"]
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
    d_weight = 0.4 * g_nll.norm() / (g_gan.norm() + 1e-4)
    torch.testing.assert_close(new["g_loss"], g_loss)
    torch.testing.assert_close(new["d_weight"], d_weight.detach())
    torch.testing.assert_close(new["total"], terms["total"] + d_weight * g_loss)
    # the generator's backward reaches the decoder but leaves the discriminator without gradients
    tiny_model.zero_grad(set_to_none=True)
    new["total"].backward()
    assert last.grad is not None and last.grad.abs().sum() > 0
    assert all(p.grad is None for p in adversarial.disc.parameters())
    adversarial.disc.train()


def test_discriminator_step_updates_only_the_discriminator_heads(adversarial, tiny_model):
    images = _images(seed=1)
    with torch.no_grad():
        fake = tiny_model(images).reconstruction
    model_before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    heads_before = {k: v.clone() for k, v in adversarial.disc.heads.state_dict().items()}
    backbone_before = {k: v.clone() for k, v in adversarial.disc.backbone.state_dict().items()}
    logged = adversarial.discriminator_step(images, fake, step=0, total_steps=10)
    assert set(logged) == {"disc_loss", "logits_real", "logits_fake", "disc_cr"}
    assert all(math.isfinite(v) for v in logged.values())
    # hinge >= 0, consistency >= 0, so the loss is at least 4 x the consistency term
    assert logged["disc_loss"] >= 4 * logged["disc_cr"] >= 0
    assert all(torch.equal(v, model_before[k]) for k, v in tiny_model.state_dict().items())
    assert all(torch.equal(v, backbone_before[k]) for k, v in adversarial.disc.backbone.state_dict().items())
    changed = [k for k, v in adversarial.disc.heads.state_dict().items() if not torch.equal(v, heads_before[k])]
    assert any(k.endswith("original") for k in changed)            # the heads' weights moved
    assert all(not p.requires_grad for p in adversarial.disc.backbone.parameters())
    # before the start nothing is computed or changed
    heads_now = {k: v.clone() for k, v in adversarial.disc.heads.state_dict().items()}
    adversarial.cfg = dataclasses.replace(adversarial.cfg, gan_start=0.5)
    try:
        assert adversarial.discriminator_step(images, fake, step=4, total_steps=10)["disc_loss"] == 0.0
    finally:
        adversarial.cfg = dataclasses.replace(adversarial.cfg, gan_start=0.0)
    assert all(torch.equal(v, heads_now[k]) for k, v in adversarial.disc.heads.state_dict().items())


def test_trainer_logs_the_delayed_gan_and_resumes_exactly(tmp_path):
    # 4 steps: the GAN starts at step index 1 (25 %) and ramps over 2 steps (0.5, 1, 1)
    extra = ["steps=4", "gan_start=0.25", "gan_warmup=0.5", "checkpoint_every=0"]
    first = _gan_trainer(extra, out_dir=tmp_path / "run")
    for _ in range(2):
        first.step()
    first.save_checkpoint()
    saved = tmp_path / "after2.pt"
    saved.write_bytes((tmp_path / "run" / "checkpoint.pt").read_bytes())
    for _ in range(2):
        first.step()
    history = first.history
    for row in history:  # logged every step
        assert {"d_weight", "g_loss", "disc_loss", "logits_real", "logits_fake", "gan_ramp"} <= set(row)
    assert [row["gan_ramp"] for row in history] == [0.0, 0.5, 1.0, 1.0]
    assert history[0]["d_weight"] == 0.0 and history[0]["disc_loss"] == 0.0
    assert all(row["d_weight"] > 0 and row["disc_loss"] > 0 for row in history[1:])

    second = _gan_trainer(extra)
    second.load_checkpoint(saved)
    assert second.step_count == 2
    resumed = [second.step() for _ in range(2)]
    for a, b in zip(history[2:], resumed):
        for key in ("loss", "l1", "l2", "vq", "g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake"):
            assert a[key] == b[key], (key, a[key], b[key])
    for (k, v), w in zip(first.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(v, w), k
    for (k, v), w in zip(first.adversarial.disc.heads.state_dict().items(),
                         second.adversarial.disc.heads.state_dict().values()):
        assert torch.equal(v, w), k


def test_a_checkpoint_without_discriminator_state_is_refused(tmp_path):
    plain = Trainer.from_preset("tiny", data="shapes", overrides=[*SMALL_GAN[:-3], "steps=2"], out_dir=tmp_path / "a")
    plain.save_checkpoint()
    gan = _gan_trainer(["steps=2"])
    with pytest.raises(ValueError, match="no discriminator state"):
        gan.load_checkpoint(tmp_path / "a" / "checkpoint.pt")


# ---------------------------------------------------------------------------------------------------------------
# weights: local files, or a clear refusal
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture
def no_weights_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(D.EXTERNAL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch_hub"))
    return tmp_path


@pytest.mark.parametrize("setting, filename, switch", [
    ("model.lpips_weight=1", "lpips_with_vgg.pth", "model.lpips_weight=0"),
    ("model.gan_weight=1", "dinov2_vits14_pretrain.pth", "model.gan_weight=0"),
])
def test_training_refuses_to_start_without_the_weights(no_weights_anywhere, setting, filename, switch):
    with pytest.raises(FileNotFoundError) as info:
        Trainer.from_preset("small", data="shapes", overrides=[setting], out_dir=no_weights_anywhere / "run")
    message = str(info.value)
    assert filename in message and "huggingface-cli download FoundationVision/unitok_external" in message
    assert "UNITOK_EXTERNAL" in message and switch in message
    assert not (no_weights_anywhere / "run").exists()  # refused before anything was written


def test_lpips_reads_the_reference_file_and_torchvision_vgg(no_weights_anywhere, monkeypatch):
    torch.manual_seed(3)
    source = D.build_lpips("random")
    state = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()
             if not k.startswith("lins.")}  # a taming-style file: heads only as lin{i}
    folder = no_weights_anywhere / "unitok_external"
    folder.mkdir()
    torch.save(state, folder / D.LPIPS_FILE)
    loaded = D.build_lpips("")  # found in ./unitok_external/
    for k, v in state.items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert torch.equal(loaded.state_dict()["lins.2.model.1.weight"], state["lin2.model.1.weight"])
    assert not any(p.requires_grad for p in loaded.parameters())
    # torchvision's VGG16 file (features.N.*) in torch's hub cache: the backbone from it, the heads from lpips
    (folder / D.LPIPS_FILE).unlink()
    vgg = {}
    for i, (lo, hi) in enumerate(D._VGG_SLICES):
        for j in range(lo, hi):
            for kind in ("weight", "bias"):
                key = f"net.slice{i + 1}.{j}.{kind}"
                if key in state:
                    vgg[f"features.{j}.{kind}"] = state[key]
    cache = no_weights_anywhere / "torch_hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(vgg, cache / D.TORCHVISION_VGG16)
    from_vgg = D.build_lpips("")
    assert torch.equal(from_vgg.state_dict()["net.slice5.28.weight"], state["net.slice5.28.weight"])
    assert torch.equal(from_vgg.state_dict()["lin0.model.1.weight"], source.state_dict()["lin0.model.1.weight"])


def test_dino_backbone_reads_meta_format_weights(no_weights_anywhere):
    import timm

    torch.manual_seed(4)
    meta = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0)  # 518 px positions
    state = {k: v for k, v in meta.state_dict().items()}
    state["mask_token"] = torch.zeros(1, 384)  # Meta's file has it; the discriminator has no use for it
    path = no_weights_anywhere / D.DINO_FILE
    torch.save(state, path)
    disc = D.DinoDiscriminator(str(path), image_size=28)
    assert torch.equal(disc.backbone.blocks[3].mlp.fc1.weight, state["blocks.3.mlp.fc1.weight"])
    assert disc.backbone.pos_embed.shape == (1, 1 + 4, 384)  # resampled to 2 x 2 patches
    bad = no_weights_anywhere / "bad.pth"
    torch.save({"blocks.0.norm1.weight": torch.zeros(3)}, bad)
    with pytest.raises((ValueError, RuntimeError, KeyError)):
        D.DinoDiscriminator(str(bad), image_size=28)


def test_lpips_term_joins_the_total():
    cfg = dataclasses.replace(get_preset("tiny").model, image_size=48, width=64, encoder_depth=1, decoder_depth=1,
                              num_heads=2, latent_dim=16, num_codebooks=4, codebook_size=64, lpips_weight=0.5)
    torch.manual_seed(0)
    model = UniTok(cfg)
    images = _images(size=48)
    loss = UniTokLoss(cfg, perceptual=D.build_lpips("random"))
    terms = loss(model(images), images)
    expected = 0.2 * terms["l1"] + terms["l2"] + terms["vq"] + 0.5 * terms["lpips"]
    torch.testing.assert_close(terms["total"], expected)
    assert terms["lpips"] > 0
    with pytest.raises(ValueError, match="needs images of at least 48 px"):
        dataclasses.replace(cfg, image_size=32)


def test_diff_augment_is_differentiable_and_random():
    x = torch.zeros(4, 3, 16, 16, requires_grad=True)
    torch.manual_seed(0)
    y = D.diff_augment(x + 0.5)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    zeroed = (y == 0).all(1).float().mean((1, 2))  # cutout (a quarter of the area, less at borders) + translation
    assert (zeroed > 0).all() and (zeroed < 0.6).all()
    torch.manual_seed(1)
    assert not torch.equal(D.diff_augment(x + 0.5), y)


@pytest.mark.slow
def test_the_full_objective_trains_a_small_model_on_cpu():
    """`small` (64 px) with LPIPS + GAN from step 0, random loss backbones: a few finite steps (the documented
    command in docs/reference_checkpoint.md runs the same from the shell)."""
    trainer = Trainer.from_preset("small", data="shapes", overrides=[
        "lpips_weight=1", "gan_weight=1", "gan_start=0", "gan_warmup=0", "lpips_weights=random",
        "dino_weights=random", "disc_image_size=56", "batch_size=2", "steps=3", "eval_every=0", "log_every=1"])
    rows = [trainer.step() for _ in range(3)]
    for row in rows:
        for key in ("loss", "lpips", "g_loss", "d_weight", "disc_loss", "logits_real", "logits_fake"):
            assert math.isfinite(row[key]), (key, row)
        assert row["lpips"] > 0 and row["d_weight"] > 0
