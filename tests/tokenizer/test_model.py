"""Tests for unitok.tokenizer.model.UniTok, unitok.tokenizer.projection, unitok.tokenizer.config and unitok.training.losses. CPU, ~15 s.

tiny and small presets run for real (batch 2); base and paper are built on the meta device (shapes and parameter
counts without allocating or computing anything).
"""
import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import AttnProjection, LinearProjection, ModelConfig, UniTok, UniTokOutput, get_preset
from unitok.tokenizer.config import Preset, TrainConfig, apply_overrides, from_dict
from unitok.training.losses import UniTokLoss
from unitok.checkpoint import load_state_dict_checked
from unitok.tokenizer.projection import ProjectionAttention, build_projection

CAPTIONS = ["a red circle", "a small blue square on the left"]


def images_for(cfg: ModelConfig, batch: int = 2, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.in_chans, cfg.image_size, cfg.image_size, generator=gen) * 2 - 1


@pytest.fixture(scope="module")
def tiny() -> UniTok:
    torch.manual_seed(0)
    return UniTok(get_preset("tiny").model).eval()


@pytest.fixture(scope="module")
def tiny_images(tiny) -> torch.Tensor:
    return images_for(tiny.config)


def is_unit_norm(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=-1), torch.ones(x.shape[0]), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Shapes for every preset


def check_public_api(model: UniTok, images: torch.Tensor) -> None:
    cfg = model.config
    B, g, k, S, E = images.shape[0], cfg.grid_size, cfg.num_codebooks, cfg.image_size, cfg.embed_dim
    with torch.no_grad():
        codes = model.encode(images)
        assert codes.shape == (B, g, g, k) and codes.dtype == torch.int64
        assert ((codes >= 0) & (codes < cfg.codebook_size)).all()
        assert model.decode(codes).shape == (B, 3, S, S)
        img = model.encode_image(images)
        assert img.shape == (B, E) and is_unit_norm(img)
        txt = model.encode_text(CAPTIONS)
        assert txt.shape == (B, E) and is_unit_norm(txt)
        ids = model.tokenize(CAPTIONS)
        assert ids.shape == (B, cfg.context_length) and ids.dtype == torch.int64
        assert torch.equal(model.encode_text(ids), txt)                      # token ids and strings agree
        assert model.encode_text("a single caption").shape == (1, E)
        out = model(images, CAPTIONS)
    check_forward_output(model, out, B)
    assert torch.equal(out.codes, codes)
    torch.testing.assert_close(out.text_features, txt)


def check_forward_output(model: UniTok, out: UniTokOutput, B: int) -> None:
    cfg = model.config
    g, k, K, S, E = cfg.grid_size, cfg.num_codebooks, cfg.codebook_size, cfg.image_size, cfg.embed_dim
    assert isinstance(out, UniTokOutput)
    assert out.reconstruction.shape == (B, 3, S, S)
    assert out.codes.shape == (B, g, g, k) and out.codes.dtype == torch.int64
    assert out.vq_loss.shape == () and out.vq_loss.dtype == torch.float32
    assert out.code_counts.shape == (k, K) and out.code_counts.dtype == torch.int64
    assert out.image_features.shape == (B, E)
    assert out.text_features is None or out.text_features.shape == (B, E)
    assert out.logit_scale.shape == ()
    assert out.entropy_loss is None
    if out.codes.device.type != "meta":
        assert torch.equal(out.code_counts.sum(1), torch.full((k,), B * g * g))
        assert is_unit_norm(out.image_features) and is_unit_norm(out.text_features)
        torch.testing.assert_close(out.logit_scale, torch.tensor(1 / 0.07))


def test_tiny_preset_shapes(tiny, tiny_images):
    assert (tiny.config.image_size, tiny.config.grid_size, tiny.config.num_codebooks) == (32, 8, 8)
    check_public_api(tiny, tiny_images)
    with torch.no_grad():
        assert tiny(tiny_images).text_features is None


def test_small_preset_shapes():
    torch.manual_seed(0)
    model = UniTok(get_preset("small").model).eval()
    assert (model.config.image_size, model.config.grid_size, model.config.num_codebooks) == (64, 8, 8)
    check_public_api(model, images_for(model.config))


@pytest.fixture(scope="module")
def base_meta() -> UniTok:
    with torch.device("meta"):
        return UniTok(get_preset("base").model).eval()


def test_base_preset_shapes_on_meta(base_meta):
    cfg = base_meta.config
    assert (cfg.image_size, cfg.grid_size, cfg.latent_dim, cfg.num_codebooks, cfg.codebook_size) == (256, 16, 64, 8, 4096)
    images = torch.empty(2, 3, 256, 256, device="meta")
    out = base_meta(images, CAPTIONS)
    check_forward_output(base_meta, out, 2)
    assert base_meta.encode(images).shape == (2, 16, 16, 8)
    assert base_meta.encode_text(CAPTIONS).shape == (2, 512)
    assert 80e6 < base_meta.num_parameters() < 120e6


def test_base_preset_lookup_paths_on_meta(base_meta):
    images = torch.empty(2, 3, 256, 256, device="meta")
    assert base_meta.encode_image(images).shape == (2, 512)
    assert base_meta.reconstruct(images).shape == (2, 3, 256, 256)
    assert base_meta.decode(torch.empty(2, 16, 16, 8, dtype=torch.long, device="meta")).shape == (2, 3, 256, 256)


def test_paper_preset_on_meta():
    with torch.device("meta"):
        model = UniTok(get_preset("paper").model)
    total = model.num_parameters()
    parts = model.num_parameters(by_part=True)
    print(f"paper preset: {total:,} parameters ({total / 1e6:.1f} M); by part: {parts}")
    assert 780e6 < total < 810e6                                    # ~795 M
    assert total == sum(p.numel() for p in model.parameters())
    assert sum(parts.values()) == total
    assert type(model.encoder).__name__ == "TimmEncoder"            # ViTamin-L from timm
    assert parts["quantizer"] == 8 * 4096 * 8
    assert model.quantizer.codebooks.shape == (8, 4096, 8)
    assert model.quant_proj.attn.num_heads == 16 and model.quant_proj.attn.head_dim == 64
    assert model.post_quant_proj.attn.qkv.weight.shape == (3 * 1024, 64)
    assert model.projection.weight.shape == (768, 1024)
    out = model(torch.empty(2, 3, 256, 256, device="meta"), CAPTIONS)
    check_forward_output(model, out, 2)
    assert out.image_features.shape == out.text_features.shape == (2, 768)


def test_num_parameters_counts_every_parameter_once(tiny):
    assert tiny.num_parameters() == sum(p.numel() for p in tiny.parameters())
    assert set(tiny.num_parameters(by_part=True)) == {
        "encoder", "quant_proj", "quantizer", "post_quant_proj", "decoder", "image_blocks", "fc_norm", "projection",
        "text_encoder", "logit_scale"}                                 # image_blocks: tiny's image-head block


# ---------------------------------------------------------------------------------------------------------------
# Gradients and consistency


def test_gradients_reach_the_encoder_through_the_straight_through_path(tiny, tiny_images):
    model = copy.deepcopy(tiny).train()
    out = model(tiny_images)
    F.mse_loss(out.reconstruction, tiny_images).backward()           # reconstruction only
    for name, p in list(model.encoder.named_parameters()) + list(model.quant_proj.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.quantizer.codebooks.grad is None                     # z_q's gradient is straight-through only

    model.zero_grad(set_to_none=True)
    model(tiny_images).vq_loss.backward()                            # VQ loss only
    grad = model.quantizer.codebooks.grad
    assert grad is not None and grad.abs().sum() > 0
    used = torch.zeros(8, 256, dtype=torch.bool)
    codes = out.codes.reshape(-1, 8)
    for i in range(8):
        used[i, codes[:, i]] = True
    assert (grad.abs().sum(-1) > 0).equal(used)                       # exactly the chosen codes get gradient
    assert model.encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # the commitment term reaches the encoder
    assert all(p.grad is None for p in model.decoder.parameters())


def test_decode_of_encode_is_reconstruct_bit_for_bit(tiny, tiny_images):
    with torch.no_grad():
        codes = tiny.encode(tiny_images)
        assert torch.equal(tiny.decode(codes), tiny.reconstruct(tiny_images))
        q = tiny.quantize(tiny_images)
        assert torch.equal(q.codes, codes.flatten(1, 2))             # row-major over the grid
        z_q = tiny.quantizer.lookup(codes.flatten(1, 2))
        # forward's z_q is the straight-through expression: equal to the looked-up codes up to 1 ulp (see
        # tests/test_quantizer.py::test_lookup_is_bit_identical_to_z_q)
        torch.testing.assert_close(z_q, q.z_q, rtol=0, atol=2 ** -23)
        out = tiny(tiny_images)
        torch.testing.assert_close(out.reconstruction, tiny.reconstruct(tiny_images), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.image_features, tiny.encode_image(tiny_images), rtol=1e-4, atol=1e-5)


def test_decoder_tokens_own_their_patches(tiny):
    """The pixel head puts token t = r * g + c (row-major) on patch (r, c) and nowhere else."""
    dec = copy.deepcopy(tiny.decoder)
    dec.blocks = nn.Identity()
    g, p = tiny.config.grid_size, tiny.config.patch_size
    tokens = torch.randn(1, g * g, tiny.config.width)
    with torch.no_grad():
        base = dec(tokens)
        for r, c in [(0, 0), (0, 5), (3, 1), (7, 7)]:
            changed = tokens.clone()
            changed[0, r * g + c] += 1.0
            diff = (dec(changed) - base).abs().sum(1)[0] > 0       # (S, S) pixels that moved
            expected = torch.zeros_like(diff)
            expected[r * p:(r + 1) * p, c * p:(c + 1) * p] = True
            assert torch.equal(diff, expected)


# ---------------------------------------------------------------------------------------------------------------
# save_pretrained / from_pretrained


def test_save_and_load_round_trip_bit_for_bit(tiny, tiny_images, tmp_path):
    tiny.save_pretrained(tmp_path)
    tiny.save_pretrained(tmp_path)                                    # overwriting leaves no temporary files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    loaded = UniTok.from_pretrained(tmp_path).eval()
    assert loaded.config == tiny.config
    # (through JSON on both sides: tuple fields such as conv_widths are stored as lists)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved == json.loads(json.dumps(dataclasses.asdict(tiny.config)))
    own, new = tiny.state_dict(), loaded.state_dict()
    assert list(own) == list(new)
    for key in own:
        assert own[key].dtype == new[key].dtype and torch.equal(own[key], new[key]), key
    with torch.no_grad():
        assert torch.equal(loaded.encode(tiny_images), tiny.encode(tiny_images))
        assert torch.equal(loaded.reconstruct(tiny_images), tiny.reconstruct(tiny_images))
        assert torch.equal(loaded.encode_image(tiny_images), tiny.encode_image(tiny_images))
        assert torch.equal(loaded.encode_text(CAPTIONS), tiny.encode_text(CAPTIONS))


def test_round_trip_of_a_non_default_config(tmp_path):
    cfg = dataclasses.replace(get_preset("tiny").model, projection="linear", num_codebooks=4, codebook_size=64,
                              dead_code_restart_every=3, encoder_depth=1, decoder_depth=1, text_layers=1)
    model = UniTok(cfg)
    model.train()(images_for(cfg))                                    # fills the dead-code usage buffers
    assert model.quantizer.usage_since_restart.sum() > 0
    model.save_pretrained(tmp_path)
    loaded = UniTok.from_pretrained(tmp_path)
    assert loaded.config == cfg
    assert isinstance(loaded.quant_proj, LinearProjection)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_loading_into_a_different_config_lists_mismatched_keys(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "codebook_size": 128}))
    with pytest.raises(ValueError, match=r"(?s)does not match.*quantizer\.codebooks: checkpoint \(8, 256, 4\) "
                                         r"vs model \(8, 128, 4\)"):
        UniTok.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**config, "projection": "linear"}))
    with pytest.raises(ValueError) as info:
        UniTok.from_pretrained(tmp_path)
    message = str(info.value)
    assert "missing: quant_proj.linear.weight" in message and "unexpected: quant_proj.attn.qkv.weight" in message
    other = UniTok(dataclasses.replace(tiny.config, latent_dim=16, encoder_depth=1, decoder_depth=1, text_layers=1))
    with pytest.raises(ValueError, match="unexpected: encoder.blocks.1"):
        load_state_dict_checked(other, tiny.state_dict())
    (tmp_path / "config.json").write_text(json.dumps({**config, "no_such_field": 1}))
    with pytest.raises(ValueError, match="unknown ModelConfig keys.*no_such_field"):
        UniTok.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        UniTok.from_pretrained(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize("method", ["encode", "reconstruct", "encode_image"])
@pytest.mark.parametrize("make, pattern", [
    (lambda: torch.zeros(2, 1, 32, 32), r"\(B, 3, 32, 32\).*3 channels.*\(2, 1, 32, 32\)"),
    (lambda: torch.zeros(2, 3, 30, 30), r"30x30 is not divisible by the patch size 4"),
    (lambda: torch.zeros(2, 3, 64, 64), r"\(B, 3, 32, 32\).*64x64.*32 px"),
    (lambda: torch.zeros(2, 3, 32, 64), r"\(B, 3, 32, 32\).*32x64"),
    (lambda: torch.zeros(3, 32, 32), r"\(B, 3, 32, 32\).*\(3, 32, 32\)"),
    (lambda: torch.zeros(2, 3, 32, 32, dtype=torch.uint8), r"float images.*uint8"),
    (lambda: torch.zeros(2, 3, 32, 32).index_fill_(3, torch.tensor([5]), float("nan")), "NaN or Inf"),
    (lambda: torch.zeros(2, 3, 32, 32).index_fill_(2, torch.tensor([0]), float("inf")), "NaN or Inf"),
    (lambda: torch.zeros(2, 3, 32, 32).index_fill_(2, torch.tensor([0]), float("-inf")), "NaN or Inf"),
])
def test_bad_images_raise(tiny, method, make, pattern):
    with pytest.raises(ValueError, match=pattern):
        getattr(tiny, method)(make())


@pytest.mark.parametrize("codes, pattern", [
    (torch.full((2, 8, 8, 8), 256), r"\[0, 256\).*256"),
    (torch.full((2, 8, 8, 8), -1), r"\[0, 256\).*-1"),
    (torch.zeros(2, 8, 8, 4, dtype=torch.long), r"\(\.\.\., 8\).*\(2, 8, 8, 4\)"),
    (torch.zeros(2, 4, 4, 8, dtype=torch.long), r"\(B, 8, 8, 8\).*\(2, 4, 4, 8\)"),
    (torch.zeros(2, 64, 8, dtype=torch.long), r"\(B, 8, 8, 8\).*\(2, 64, 8\)"),
    (torch.zeros(2, 8, 8, 8), r"integer.*float32"),
])
def test_bad_codes_raise(tiny, codes, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny.decode(codes)


@pytest.mark.parametrize("texts, pattern", [
    ([""], "non-empty caption"),
    (["a red circle", "   "], "non-empty caption"),
    ([], "an empty list"),
    ("", "non-empty caption"),
    ([3], "non-empty caption"),
    (torch.zeros(2, 5, dtype=torch.long), r"\(B, 24\).*\(2, 5\)"),
    (torch.zeros(2, 24), r"integer.*float32"),
    (torch.full((2, 24), 49408), r"\[0, 49408\)"),
    (torch.full((2, 24), -1), r"\[0, 49408\)"),
])
def test_bad_texts_raise(tiny, tiny_images, texts, pattern):
    with pytest.raises(ValueError, match=pattern):
        tiny.encode_text(texts)
    if not isinstance(texts, torch.Tensor) and texts != "":
        with pytest.raises(ValueError, match=pattern):
            tiny(tiny_images, texts)


# ---------------------------------------------------------------------------------------------------------------
# Projections


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():             # LayerNorm gains near 1, everything else near 0
            gain = name.startswith("norm") and name.endswith(".weight")
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if gain else 0.0))
    return module


def manual_attention(attn: ProjectionAttention, x: torch.Tensor, heads: int, head_dim: int, down: bool,
                     causal: bool = False) -> torch.Tensor:
    """docs/method.md, AttnProjection: q/k/v from one Linear (bias on q and v only); per-head softmax attention; heads averaged
    going down, concatenated going up; then a Linear(out, out)."""
    B, N, _ = x.shape
    inner = heads * head_dim
    w = attn.qkv.weight
    q = x @ w[:inner].T + attn.q_bias
    k = x @ w[inner:2 * inner].T
    v = x @ w[2 * inner:].T + attn.v_bias
    split = lambda t: t.view(B, N, heads, head_dim).transpose(1, 2)  # noqa: E731  (B, h, N, hd)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim)
    if causal:
        scores = scores.masked_fill(torch.ones(N, N, dtype=torch.bool).triu(1), float("-inf"))
    y = scores.softmax(-1) @ split(v)                                 # (B, h, N, hd)
    y = y.mean(1) if down else y.transpose(1, 2).reshape(B, N, inner)
    return attn.proj(y)


@pytest.mark.parametrize("causal", [False, True])
def test_attn_projection_down_averages_heads(causal):
    proj = randomize(AttnProjection(128, 32, causal=causal))
    attn = proj.attn
    assert (attn.num_heads, attn.head_dim, attn.down) == (4, 32, True)
    assert attn.qkv.weight.shape == (3 * 128, 128) and attn.qkv.bias is None   # no k bias
    assert attn.q_bias.shape == attn.v_bias.shape == (128,)
    assert attn.proj.weight.shape == (32, 32)
    x = torch.randn(2, 10, 128)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), manual_attention(attn, x, 4, 32, down=True, causal=causal),
                                   rtol=1e-4, atol=1e-5)
        y = proj(x)
    assert y.shape == (2, 10, 32)
    check_attn_projection_formula(proj, x, y)


@pytest.mark.parametrize("causal", [False, True])
def test_attn_projection_up_concatenates_heads(causal):
    proj = randomize(AttnProjection(32, 128, causal=causal), seed=1)
    attn = proj.attn
    assert (attn.num_heads, attn.head_dim, attn.down) == (4, 32, False)
    assert attn.qkv.weight.shape == (3 * 128, 32)                    # qkv maps 32 -> 3 * 128
    assert attn.proj.weight.shape == (128, 128)
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), manual_attention(attn, x, 4, 32, down=False, causal=causal),
                                   rtol=1e-4, atol=1e-5)
        y = proj(x)
    assert y.shape == (2, 10, 128)
    check_attn_projection_formula(proj, x, y)


def check_attn_projection_formula(proj: AttnProjection, x: torch.Tensor, y: torch.Tensor) -> None:
    """y = Linear(LN_a(x)) + Attn(LN_b(x)); y = y + GeGLU_MLP(LN_c(y)) with MLP hidden = 2 x out."""
    out = proj.out_dim
    assert proj.mlp.fc1.weight.shape == (4 * out, out) and proj.mlp.fc2.weight.shape == (out, 2 * out)
    with torch.no_grad():
        h = proj.shortcut(proj.norm_shortcut(x)) + proj.attn(proj.norm_attn(x))
        value, gate = proj.mlp.fc1(proj.norm_mlp(h)).chunk(2, dim=-1)
        expected = h + proj.mlp.fc2(value * F.gelu(gate))
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_reference_head_count():
    """1024 -> 64: heads = 1024 / 64 = 16 of dim 64, averaged; 64 -> 1024: qkv 64 -> 3 * 1024, concatenated."""
    with torch.device("meta"):
        down, up = AttnProjection(1024, 64), AttnProjection(64, 1024)
    assert (down.attn.num_heads, down.attn.head_dim) == (16, 64) and down.attn.down
    assert (up.attn.num_heads, up.attn.head_dim) == (16, 64) and not up.attn.down
    assert up.attn.qkv.weight.shape == (3 * 1024, 64)
    with pytest.raises(ValueError, match="one size to divide the other"):
        AttnProjection(128, 48)


@pytest.mark.parametrize("dims", [(128, 32), (32, 128)])
def test_causal_option(dims):
    x = torch.randn(1, 8, dims[0])
    later = x.clone()
    later[:, 5:] += torch.randn(1, 3, dims[0])                        # perturb tokens 5, 6, 7
    for causal in (True, False):
        proj = randomize(AttnProjection(*dims, causal=causal), seed=2)
        with torch.no_grad():
            a, b = proj(x), proj(later)
        assert (a[:, 5:] - b[:, 5:]).abs().amax(-1).min() > 1e-3        # the perturbed tokens change
        earlier_diff = (a[:, :5] - b[:, :5]).abs().max()
        if causal:
            assert earlier_diff <= 1e-6                               # token t does not see tokens > t
        else:
            assert earlier_diff > 1e-3                                # full attention does


def test_linear_projection():
    proj = randomize(LinearProjection(128, 32, causal=True))
    x = torch.randn(2, 6, 128)
    with torch.no_grad():
        y = proj(x)
        assert y.shape == (2, 6, 32)
        torch.testing.assert_close(y, proj.linear(F.layer_norm(x, (128,), proj.norm.weight, proj.norm.bias)))
        x2 = x.clone()
        x2[:, 3] += 1
        assert torch.equal(proj(x2)[:, :3], y[:, :3]) and torch.equal(proj(x2)[:, 4:], y[:, 4:])   # per token
    assert isinstance(build_projection("linear", 128, 32), LinearProjection)
    assert isinstance(build_projection("attn", 128, 32), AttnProjection)
    with pytest.raises(ValueError, match="'attn' or 'linear'"):
        build_projection("conv", 128, 32)
    cfg = dataclasses.replace(get_preset("tiny").model, projection="linear", encoder_depth=1, decoder_depth=1,
                              text_layers=1)
    model = UniTok(cfg).eval()
    assert isinstance(model.quant_proj, LinearProjection) and isinstance(model.post_quant_proj, LinearProjection)
    with torch.no_grad():
        assert model.encode(images_for(cfg)).shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("changes, pattern", [
    ({"latent_dim": 30}, "latent_dim 30 must be divisible by num_codebooks 8"),
    ({"image_size": 30}, "image_size 30 must be divisible by patch_size 4"),
    ({"width": 130}, "width 130 must be divisible by num_heads 4"),
    ({"latent_dim": 48, "num_codebooks": 8}, "width 128 to be a multiple of latent_dim 48"),
    ({"projection": "conv"}, "projection must be 'attn' or 'linear'"),
    ({"mlp": "relu"}, "mlp must be 'gelu' or 'geglu'"),
    ({"text_width": 66}, "text_width 66 must be divisible by text_heads 4"),
    ({"codebook_size": 0}, "codebook_size=0 is not allowed; expected a number > 0"),
    ({"num_heads": 0}, "num_heads=0 is not allowed"),   # named, not a ZeroDivisionError
])
def test_config_validation(changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        ModelConfig(**changes)


def test_config_reports_every_problem_at_once():
    with pytest.raises(ValueError) as info:
        ModelConfig(latent_dim=30, image_size=30)
    assert "latent_dim 30" in str(info.value) and "image_size 30" in str(info.value)
    # linear projection lifts the width/latent_dim constraint
    assert ModelConfig(latent_dim=48, projection="linear").latent_dim == 48


def test_presets_are_fresh_printable_values():
    a = get_preset("tiny")
    a.model.codebook_size = 3
    assert get_preset("tiny").model.codebook_size == 256
    assert "codebook_size=256" in repr(get_preset("tiny").model)
    with pytest.raises(ValueError, match="unknown preset 'huge'.*paper"):
        get_preset("huge")


def test_apply_overrides():
    preset = get_preset("tiny")
    new = apply_overrides(preset, ["model.num_codebooks=4", "train.steps=200", "lr=1e-3", "projection=linear",
                                   "train.betas=[0.9, 0.99]", "amp=false", "encoder = vit", "mlp_ratio=2"])
    assert isinstance(new, Preset)
    assert new.model.num_codebooks == 4 and new.train.steps == 200 and isinstance(new.train.steps, int)
    assert new.train.lr == 1e-3 and new.model.projection == "linear" and new.train.betas == (0.9, 0.99)
    assert new.train.amp is False and new.model.encoder == "vit" and new.model.mlp_ratio == 2
    assert preset.model.num_codebooks == 8 and preset.train.steps == get_preset("tiny").train.steps  # unchanged
    assert apply_overrides(preset, {"model.codebook_size": 64, "seed": "3"}).model.codebook_size == 64
    assert apply_overrides(preset, {"seed": "3"}).train.seed == 3
    with pytest.raises(ValueError, match="unknown setting 'model.nonsense'"):
        apply_overrides(preset, ["model.nonsense=1"])
    with pytest.raises(ValueError, match="unknown setting 'model.steps'"):            # right key, wrong section
        apply_overrides(preset, ["model.steps=1"])
    with pytest.raises(ValueError, match="unknown setting 'lrr'"):
        apply_overrides(preset, ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(preset, ["steps"])
    with pytest.raises(ValueError, match="latent_dim 30 must be divisible"):           # validated after overriding
        apply_overrides(preset, ["latent_dim=30"])
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        from_dict(TrainConfig, {"stepz": 1})


@pytest.mark.parametrize("override, field, expected", [
    ("train.amp=False", "amp", False),
    ("model.projection_causal=False", "projection_causal", False),
    ("train.steps=1e3", "steps", 1000),
])
def test_apply_overrides_gives_values_of_the_fields_type(override, field, expected):
    try:
        new = apply_overrides(get_preset("tiny"), [override])
    except ValueError:
        return                                                     # refusing the value is fine too
    section = new.train if override.startswith("train.") else new.model
    value = getattr(section, field)
    assert value == expected and type(value) is type(expected), f"{override} gave {value!r}"


# ---------------------------------------------------------------------------------------------------------------
# Losses


def test_unitok_loss_terms_and_weights(tiny, tiny_images):
    loss_fn = UniTokLoss(tiny.config)
    with torch.no_grad():
        out = tiny(tiny_images, CAPTIONS)
        terms = loss_fn(out, tiny_images)
    assert set(terms) == {"l1", "l2", "vq", "clip", "total"}
    assert all(t.shape == () and torch.isfinite(t) for t in terms.values())
    torch.testing.assert_close(terms["l1"], (out.reconstruction - tiny_images).abs().mean())
    torch.testing.assert_close(terms["l2"], ((out.reconstruction - tiny_images) ** 2).mean())
    assert torch.equal(terms["vq"], out.vq_loss)
    logits = out.logit_scale * out.image_features @ out.text_features.T
    labels = torch.arange(2)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(terms["clip"], clip)
    expected = 0.2 * terms["l1"] + 1.0 * terms["l2"] + 1.0 * terms["vq"] + 1.0 * terms["clip"]
    torch.testing.assert_close(terms["total"], expected)
    # the weights come from the config
    cfg = dataclasses.replace(tiny.config, l1_weight=0.5, l2_weight=2.0, vq_weight=0.0, clip_weight=3.0)
    terms2 = UniTokLoss(cfg)(out, tiny_images)
    torch.testing.assert_close(terms2["total"], 0.5 * terms["l1"] + 2.0 * terms["l2"] + 3.0 * terms["clip"])
    # without texts there is no clip term
    with torch.no_grad():
        no_text = loss_fn(tiny(tiny_images), tiny_images)
    assert set(no_text) == {"l1", "l2", "vq", "total"}
    torch.testing.assert_close(no_text["total"], 0.2 * no_text["l1"] + no_text["l2"] + no_text["vq"])


def test_entropy_term_is_logged_not_counted_twice(tiny, tiny_images):
    model = copy.deepcopy(tiny)
    model.quantizer.entropy_weight = 0.5
    with torch.no_grad():
        out = model(tiny_images, CAPTIONS)
        terms = UniTokLoss(model.config)(out, tiny_images)
    assert "entropy" in terms and torch.equal(terms["entropy"], out.entropy_loss)
    torch.testing.assert_close(terms["total"], 0.2 * terms["l1"] + terms["l2"] + terms["vq"] + terms["clip"])


def test_logit_scale_is_clamped(tiny, tiny_images):
    model = copy.deepcopy(tiny)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))                     # above ln(100)
        out = model(tiny_images, CAPTIONS)
    assert out.logit_scale <= 100.0 * (1 + 1e-6)
    torch.testing.assert_close(out.logit_scale, torch.tensor(100.0))
    assert model.logit_scale.item() == pytest.approx(math.log(1000.0))   # the parameter itself is untouched


def test_tokenize_caches_each_caption_and_gives_the_bpe_tokenizers_ids(monkeypatch):
    from unitok.tokenizer import model as model_module

    m = UniTok(get_preset("tiny").model)
    texts = ["a red circle", "a blue star on the left", "a red circle", "a green square"]
    direct = m.tokenizer(texts)                                     # open_clip's BPE, no cache
    first = m.tokenize(texts)
    assert torch.equal(first, direct) and first.dtype == torch.int64
    assert len(m._token_rows) == 3                                  # each distinct caption once
    first.zero_()                                                   # the caller's tensor is its own
    assert torch.equal(m.tokenize(texts), direct)
    monkeypatch.setattr(model_module, "TOKEN_CACHE_SIZE", 4)
    more = ["a small triangle", "a large star"]
    assert torch.equal(m.tokenize(more), m.tokenizer(more))         # 3 + 2 > 4: the cache starts again
    assert set(m._token_rows) == set(more)


@pytest.mark.parametrize("in_dim, out_dim", [(32, 64), (64, 16)])
def test_causal_projection_decoded_with_its_cache_equals_one_pass(in_dim, out_dim):
    torch.manual_seed(0)
    proj = AttnProjection(in_dim, out_dim, causal=True).eval()
    x = torch.randn(3, 7, in_dim)
    with torch.no_grad():
        full = proj(x)
        cache: dict = {}
        pieces = [proj(x[:, :3], cache)] + [proj(x[:, t:t + 1], cache) for t in range(3, 7)]   # a prefill, then one by one
    assert torch.allclose(torch.cat(pieces, 1), full, atol=1e-5)
    assert cache["k"].shape[2] == 7
    with pytest.raises(ValueError, match="needs causal attention"):
        AttnProjection(in_dim, out_dim)(x, {})
