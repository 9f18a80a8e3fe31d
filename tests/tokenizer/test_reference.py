"""The released-checkpoint path: a reference-format file written here (random weights, reduced depth and widths)
loads with `load_reference`, converts, and computes what the reference layout computes.

The file is assembled from the documented format (docs/reference_checkpoint.md): `args` + `trainer.unitok`, the
k codebooks as separate `quantizer.codebooks.{i}.codebook.weight`, `vocab_usage` buffers, zero `zero_k_bias` and
`encoder.pos_embed` buffers. The block computations are checked against functional re-computations written from the
same description, not against the modules themselves.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unitok
from unitok import ModelConfig, UniTok
from unitok.tokenizer import reference as R

W, LATENT, K, KB = 128, 16, 32, 4         # width, latent, codes per codebook, codebooks
STEM, S1, S2, C2, C3 = 8, 8, 16, 16, 8    # conv widths (the real large model: 160, 160, 320 / 320, 160)


def small_reference_config(**changes) -> ModelConfig:
    values = dict(image_size=64, patch_size=16, encoder="vitamin_large", decoder="vitamin",
                  projection="attn_reference", width=W, encoder_depth=2, decoder_depth=3, num_heads=W // 64,
                  mlp="geglu", mlp_ratio=2.0, conv_widths=(STEM, S1, S2), conv_depths=(2, 4),
                  decoder_conv_widths=(C2, C3), decoder_conv_depths=(4, 2), fc_norm_eps=1e-6, latent_dim=LATENT,
                  num_codebooks=KB, codebook_size=K, embed_dim=32, text_width=64, text_layers=2, text_heads=1,
                  context_length=16)
    values.update(changes)
    return ModelConfig(**values)


def reference_blob(model: UniTok) -> dict:
    """The reference's checkpoint dict for `model`, built here from the documented layout."""
    cfg = model.config
    state = {}
    for key, value in model.state_dict().items():
        if key == "quantizer.codebooks":  # ours: one (k, K, d) tensor; the reference: k modules
            for i in range(cfg.num_codebooks):
                state[f"quantizer.codebooks.{i}.codebook.weight"] = value[i].clone()
                state[f"quantizer.codebooks.{i}.vocab_usage"] = torch.rand(cfg.codebook_size)
        else:
            state[key] = value.clone()
    for proj in ("quant_proj", "post_quant_proj"):
        state[f"{proj}.attn.zero_k_bias"] = torch.zeros_like(state[f"{proj}.attn.q_bias"])
    state["encoder.pos_embed"] = torch.zeros(1, 1, cfg.width)
    state["logit_scale"] = state["logit_scale"].reshape(1)  # a 1-element tensor loads as the scalar
    args = {"model": "vitamin_large", "img_size": cfg.image_size, "resize_ratio": 1.125,
            "vocab_size": cfg.codebook_size * cfg.num_codebooks, "vocab_width": cfg.latent_dim,
            "num_codebooks": cfg.num_codebooks, "quant_proj": "attn", "vq_beta": 0.25, "le": 0.0, "e_temp": 0.01,
            "num_query": 0, "embed_dim": cfg.embed_dim, "text_width": cfg.text_width, "text_heads": cfg.text_heads,
            "text_layers": cfg.text_layers, "text_vocab_size": cfg.vocab_size,
            "text_context_length": cfg.context_length, "drop_path": 0.0, "grad_ckpt": True,
            "dtype": torch.bfloat16}
    return {"args": args, "epoch": 3, "iter": 1000, "trainer": {"unitok": state, "optimizer": {}}}


@pytest.fixture(scope="module")
def original():
    torch.manual_seed(0)
    model = UniTok(small_reference_config()).eval()
    with torch.no_grad():  # make every parameter non-trivial (LayerNorms start at ones/zeros)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


@pytest.fixture(scope="module")
def ref_file(original, tmp_path_factory):
    path = tmp_path_factory.mktemp("ref") / "unitok_tokenizer.pth"
    torch.save(reference_blob(original), path)
    return path


@pytest.fixture(scope="module")
def loaded(ref_file):
    return R.load_reference(ref_file)


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1


def outputs(model, images):
    with torch.no_grad():
        codes = model.encode(images)
        return {"codes": codes, "decode": model.decode(codes), "recon": model.reconstruct(images),
                "image": model.encode_image(images), "text": model.encode_text(["a photo of a cat", "a red car"]),
                "latent": model.encode_latent(images)}


# ---------------------------------------------------------------------------------------------------------------
def test_documented_keys_and_shapes(ref_file):
    """The file written from our reference-layout model has the documented names and shapes (reduced widths)."""
    args, state = R.read_reference(ref_file)
    expect = {
        "encoder.patch_embed.backbone.stem.conv1.weight": (STEM, 3, 3, 3),
        "encoder.patch_embed.backbone.stem.conv2.weight": (STEM, STEM, 3, 3),
        "encoder.patch_embed.backbone.stages.0.1.conv1_1x1.weight": (4 * S1, S1, 1, 1),
        "encoder.patch_embed.backbone.stages.1.3.conv3_1x1.weight": (S2, 4 * S2, 1, 1),
        "encoder.patch_embed.backbone.pool.proj.weight": (W, S2, 3, 3),
        "encoder.patch_embed.backbone.pool.norm.weight": (S2,),
        "encoder.blocks.1.attn.qkv.weight": (3 * W, W), "encoder.blocks.1.attn.qkv.bias": (3 * W,),
        "encoder.blocks.1.mlp.norm.weight": (W,), "encoder.blocks.1.mlp.w0.weight": (2 * W, W),
        "encoder.blocks.1.mlp.w1.weight": (2 * W, W), "encoder.blocks.1.mlp.w2.weight": (W, 2 * W),
        "encoder.norm.weight": (W,), "encoder.pos_embed": (1, 1, W),
        "quant_proj.attn.qkv.weight": (3 * W, W), "quant_proj.attn.q_bias": (W,), "quant_proj.attn.zero_k_bias": (W,),
        "quant_proj.proj.weight": (LATENT, W), "quant_proj.norm3.weight": (W,), "quant_proj.norm2.weight": (LATENT,),
        "quant_proj.mlp.w0.weight": (2 * LATENT, LATENT), "post_quant_proj.attn.qkv.weight": (3 * W, LATENT),
        "post_quant_proj.mlp.w2.weight": (W, 2 * W),
        "quantizer.codebooks.3.codebook.weight": (K, LATENT // KB), "quantizer.codebooks.3.vocab_usage": (K,),
        "decoder.blocks.2.mlp.w0.weight": (2 * W, W), "decoder.norm.weight": (W,),
        "decoder.up_conv1.conv.weight": (C2, W, 3, 3),
        "decoder.up_conv2.0.shortcut.conv.weight": (C2, C2, 3, 3), "decoder.up_conv2.0.pre_norm.weight": (C2,),
        "decoder.up_conv2.0.conv1_1x1.weight": (4 * C2, C2, 1, 1), "decoder.up_conv2.0.up.conv.weight":
            (4 * C2, 4 * C2, 3, 3), "decoder.up_conv2.0.conv2_kxk.weight": (4 * C2, 1, 3, 3),
        "decoder.up_conv2.3.conv3_1x1.weight": (C2, 4 * C2, 1, 1),
        "decoder.up_conv3.0.shortcut.conv.weight": (C3, C2, 3, 3), "decoder.up_conv3.1.conv1_1x1.weight":
            (4 * C3, C3, 1, 1), "decoder.up_conv4.conv1.conv.weight": (C3, C3, 3, 3),
        "decoder.up_conv4.norm1.weight": (C3,), "decoder.up_conv4.conv2.weight": (3, C3, 3, 3),
        "text_encoder.text_projection": (64, 32), "text_encoder.positional_embedding": (16, 64),
        "fc_norm.weight": (W,), "projection.weight": (32, W), "logit_scale": (1,),
    }
    for key, shape in expect.items():
        assert tuple(state[key].shape) == shape, key
    assert "quant_proj.attn.qkv.bias" not in state and "decoder.pos_embed" not in state
    assert not any(k.startswith("decoder.up_conv2.1.shortcut") for k in state)  # identity shortcut at stride 1
    assert args["dtype"] is torch.bfloat16  # a torch.dtype in args passes weights_only loading


def test_config_is_inferred_from_args_and_state(loaded, original):
    cfg = loaded.config
    assert (cfg.width, cfg.encoder_depth, cfg.decoder_depth, cfg.num_heads) == (W, 2, 3, 2)
    assert tuple(cfg.conv_widths) == (STEM, S1, S2) and tuple(cfg.conv_depths) == (2, 4)
    assert tuple(cfg.decoder_conv_widths) == (C2, C3) and tuple(cfg.decoder_conv_depths) == (4, 2)
    assert (cfg.latent_dim, cfg.num_codebooks, cfg.codebook_size, cfg.fc_norm_eps) == (LATENT, KB, K, 1e-6)
    assert (cfg.text_width, cfg.text_layers, cfg.context_length, cfg.embed_dim) == (64, 2, 16, 32)
    assert cfg == original.config
    assert not loaded.training


def test_from_reference_computes_what_the_original_computes(loaded, original, images):
    a, b = outputs(original, images), outputs(loaded, images)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert a["codes"].shape == (2, 4, 4, KB) and a["recon"].shape == (2, 3, 64, 64)
    assert a["recon"].abs().max() <= 1  # clamped at inference, as the reference


def test_convert_then_from_pretrained_round_trips(ref_file, original, images, tmp_path, capsys):
    from unitok.cli import main

    out = tmp_path / "converted"
    assert main(["convert", str(ref_file), str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "converted" in capsys.readouterr().out
    model = UniTok.from_pretrained(out).eval()
    a, b = outputs(original, images), outputs(model, images)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # a second conversion into the same folder is refused, and allowed with --overwrite
    assert main(["convert", str(ref_file), str(out)]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["convert", str(ref_file), str(out), "--overwrite"]) == 0


def test_to_reference_checkpoint_is_the_documented_format(original, ref_file):
    mine = R.to_reference_checkpoint(original)["trainer"]["unitok"]
    _, documented = R.read_reference(ref_file)
    assert set(mine) == set(documented)
    assert all(mine[k].shape == documented[k].shape or k == "logit_scale" for k in mine)


def test_causal_and_full_attention_differ(ref_file, loaded, images):
    causal = R.load_reference(ref_file, projection_causal=True)
    tokens = torch.randn(2, 16, W)
    changed = tokens.clone()
    changed[:, 1:] = torch.randn(2, 15, W)
    with torch.no_grad():
        full_latent, causal_latent = loaded.encode_latent(images), causal.encode_latent(images)
        # under causal attention the first token sees only itself: changing the others leaves it unchanged
        first, first_changed = causal.quant_proj(tokens)[:, 0], causal.quant_proj(changed)[:, 0]
        full_first, full_first_changed = loaded.quant_proj(tokens)[:, 0], loaded.quant_proj(changed)[:, 0]
    assert not torch.allclose(full_latent, causal_latent, atol=1e-4)
    assert torch.allclose(first, first_changed, atol=1e-6)
    assert not torch.allclose(full_first, full_first_changed, atol=1e-4)
    assert torch.equal(full_latent, loaded.encode_latent(images))
    assert causal.config.projection_causal and not loaded.config.projection_causal


# ---------------------------------------------------------------------------------------------------------------
# the computations, re-done functionally from the description
# ---------------------------------------------------------------------------------------------------------------
def _ln(x, state, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], state[prefix + ".weight"], state[prefix + ".bias"], eps)


def _ln2d(x, state, prefix):
    return _ln(x.permute(0, 2, 3, 1), state, prefix, 1e-6).permute(0, 3, 1, 2)


def _geglu(x, state, prefix):
    n = _ln(x, state, prefix + ".norm", 1e-6)
    h = F.gelu(F.linear(n, state[prefix + ".w0.weight"], state[prefix + ".w0.bias"]), approximate="tanh")
    h = h * F.linear(n, state[prefix + ".w1.weight"], state[prefix + ".w1.bias"])
    return F.linear(h, state[prefix + ".w2.weight"], state[prefix + ".w2.bias"])


def _projection(x, state, p, in_dim, out_dim, heads):
    """y = proj(norm3(x)) + attn(norm1(x)); y = y + mlp(norm2(y)); plain LayerNorms, GeGLU with its own LN."""
    a = _ln(x, state, p + ".norm1", 1e-5)
    inner = max(in_dim, out_dim)
    bias = torch.cat([state[p + ".attn.q_bias"], state[p + ".attn.zero_k_bias"], state[p + ".attn.v_bias"]])
    B, N, _ = x.shape
    q, k, v = F.linear(a, state[p + ".attn.qkv.weight"], bias).view(B, N, 3, heads, inner // heads).permute(
        2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(inner // heads), -1) @ v     # (B, heads, N, hd)
    att = att.mean(1) if out_dim < in_dim else att.transpose(1, 2).reshape(B, N, inner)
    att = F.linear(att, state[p + ".attn.proj.weight"], state[p + ".attn.proj.bias"])
    y = F.linear(_ln(x, state, p + ".norm3", 1e-5), state[p + ".proj.weight"], state[p + ".proj.bias"]) + att
    return y + _geglu(_ln(y, state, p + ".norm2", 1e-5), state, p + ".mlp")


def _up(x, state, p):
    return F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), state[p + ".weight"], state[p + ".bias"],
                    padding=1)


def _inv_mbconv(x, state, p, stride):
    conv = lambda t, name, **kw: F.conv2d(t, state[f"{p}.{name}.weight"], state[f"{p}.{name}.bias"], **kw)  # noqa
    shortcut = _up(x, state, p + ".shortcut.conv") if stride == 2 else x
    y = F.gelu(conv(_ln2d(x, state, p + ".pre_norm"), "conv1_1x1"))
    if stride == 2:
        y = _up(y, state, p + ".up.conv")
    y = F.gelu(conv(y, "conv2_kxk", padding=1, groups=y.shape[1]))
    return conv(y, "conv3_1x1") + shortcut


def test_projections_compute_the_reference_formula(loaded, ref_file):
    _, state = R.read_reference(ref_file)
    x = torch.randn(2, 16, W)
    z = torch.randn(2, 16, LATENT)
    with torch.no_grad():
        torch.testing.assert_close(loaded.quant_proj(x), _projection(x, state, "quant_proj", W, LATENT, W // LATENT),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loaded.post_quant_proj(z),
                                   _projection(z, state, "post_quant_proj", LATENT, W, W // LATENT),
                                   rtol=1e-5, atol=1e-5)


def test_encoder_block_and_decoder_convs_compute_the_reference_formula(loaded, ref_file):
    _, state = R.read_reference(ref_file)
    x = torch.randn(2, 16, W)
    with torch.no_grad():
        block = loaded.encoder.blocks[0]
        torch.testing.assert_close(block.mlp(x), _geglu(x, state, "encoder.blocks.0.mlp"), rtol=1e-5, atol=1e-5)
        # the decoder after its transformer: up_conv1 .. up_conv4, 16x up in total, clamped at inference
        tokens = torch.randn(2, 16, W)
        h = _ln(loaded.decoder.blocks(tokens), state, "decoder.norm", 1e-6).transpose(1, 2).reshape(2, W, 4, 4)
        h = _up(h, state, "decoder.up_conv1.conv")
        for i in range(4):
            h = _inv_mbconv(h, state, f"decoder.up_conv2.{i}", 2 if i == 0 else 1)
        for i in range(2):
            h = _inv_mbconv(h, state, f"decoder.up_conv3.{i}", 2 if i == 0 else 1)
        h = _up(h, state, "decoder.up_conv4.conv1.conv")
        h = F.gelu(_ln2d(h, state, "decoder.up_conv4.norm1"))
        h = F.conv2d(h, state["decoder.up_conv4.conv2.weight"], state["decoder.up_conv4.conv2.bias"], padding=1)
        torch.testing.assert_close(loaded.decoder(tokens), h.clamp(-1, 1), rtol=1e-5, atol=1e-5)
        # the image head: mean over tokens -> LayerNorm eps 1e-6 -> Linear -> unit norm
        feat = F.linear(_ln(tokens.mean(1), state, "fc_norm", 1e-6), state["projection.weight"],
                        state["projection.bias"])
        torch.testing.assert_close(loaded.image_head(tokens), F.normalize(feat, dim=-1), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# every key accounted for; bad files
# ---------------------------------------------------------------------------------------------------------------
def _write(tmp_path, blob, name="bad.pth"):
    path = tmp_path / name
    torch.save(blob, path)
    return path


def test_a_leftover_or_missing_key_is_an_error(original, tmp_path):
    blob = reference_blob(original)
    blob["trainer"]["unitok"]["decoder.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected: decoder.extra.weight"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    del blob["trainer"]["unitok"]["decoder.up_conv4.norm1.bias"]
    with pytest.raises(ValueError, match="missing: decoder.up_conv4.norm1.bias"):
        R.load_reference(_write(tmp_path, blob))


def test_dropped_buffers_are_checked(original, tmp_path):
    blob = reference_blob(original)
    blob["trainer"]["unitok"]["quant_proj.attn.zero_k_bias"] += 1
    with pytest.raises(ValueError, match="zero_k_bias: expected an all-zero buffer"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    blob["trainer"]["unitok"]["quantizer.codebooks.1.vocab_usage"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"vocab_usage: expected a \(32,\) usage buffer"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    del blob["trainer"]["unitok"]["quantizer.codebooks.2.codebook.weight"]
    with pytest.raises(ValueError, match="args and state dict disagree: num_codebooks|codebooks 0..3"):
        R.load_reference(_write(tmp_path, blob))


def test_mismatched_shapes_are_clear_errors(original, tmp_path):
    blob = reference_blob(original)
    blob["args"]["vocab_width"] = 32  # the file's projections say 16
    with pytest.raises(ValueError, match="vocab_width: args say 32, the state dict has 16"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    blob["trainer"]["unitok"]["decoder.blocks.0.mlp.w0.weight"] = torch.zeros(3 * W, W)
    with pytest.raises(ValueError, match=r"shape mismatch decoder.blocks.0.mlp.w0.weight: checkpoint \(384, 128\)"):
        R.load_reference(_write(tmp_path, blob))


def test_bad_files_give_clear_errors(original, tmp_path):
    with pytest.raises(ValueError, match="expected a dict with 'args' and 'trainer'.*got list"):
        R.read_reference(_write(tmp_path, [torch.zeros(2)]))
    blob = reference_blob(original)
    del blob["args"]
    with pytest.raises(ValueError, match="expected a dict with an 'args' dict"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    blob["args"] = argparse.Namespace(model="vitamin_large")  # a pickled object: weights_only refuses it
    with pytest.raises(ValueError, match=r"cannot be read safely with torch.load\(weights_only=True\)"):
        R.load_reference(_write(tmp_path, blob))
    blob = reference_blob(original)
    blob["trainer"] = {"unitok": {"a": "not a tensor"}}
    with pytest.raises(ValueError, match=r"blob\['trainer'\]\['unitok'\] to be a state dict of tensors"):
        R.load_reference(_write(tmp_path, blob))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable torch checkpoint"):
        R.load_reference(garbage)
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        R.load_reference(tmp_path / "absent.pth")
    blob = reference_blob(original)
    blob["args"]["model"] = "vitamin_huge"
    with pytest.raises(ValueError, match="model='vitamin_huge' is not supported"):
        R.load_reference(_write(tmp_path, blob))


def test_hub_download_failure_says_where_to_put_the_file(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("Max retries exceeded (offline)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError) as info:
        R.load_reference("FoundationVision/unitok_tokenizer")
    message = str(info.value)
    assert "huggingface-cli download FoundationVision/unitok_tokenizer unitok_tokenizer.pth" in message
    assert "UNITOK_REFERENCE" in message and "ConnectionError" in message


def test_find_reference_looks_at_the_environment_variable(ref_file, monkeypatch, tmp_path):
    monkeypatch.setenv("UNITOK_REFERENCE", str(ref_file))
    assert R.find_reference() == ref_file
    monkeypatch.setenv("UNITOK_REFERENCE", str(tmp_path / "absent.pth"))
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    assert R.find_reference() is None
    assert R.resolve_reference(ref_file.parent) == ref_file  # a folder holding the file


def test_config_from_reference_without_a_state_dict_is_the_released_size():
    cfg = R.config_from_reference({"model": "vitamin_large", "img_size": 256, "vocab_size": 32768,
                                   "vocab_width": 64, "num_codebooks": 8, "embed_dim": 768,
                                   "text_width": 768, "text_heads": 12, "text_layers": 12,
                                   "text_vocab_size": 49408, "text_context_length": 77})
    assert (cfg.width, cfg.encoder_depth, cfg.num_heads, cfg.codebook_size, cfg.grid_size) == (1024, 31, 16, 4096, 16)
    with torch.device("meta"):
        model = UniTok(cfg)
    assert model.decoder.last_layer.shape == (3, 160, 3, 3)
    assert model.quant_proj.attn.num_heads == 16 and model.quant_proj.attn.head_dim == 64


# ---------------------------------------------------------------------------------------------------------------
# codes and images in the reference's conventions
# ---------------------------------------------------------------------------------------------------------------
def test_codes_layout_conversion():
    codes = torch.randint(0, 4096, (2, 16, 16, 8))
    ref = unitok.codes_to_reference(codes)
    assert ref.shape == (2, 8, 256)
    assert ref[1, 5, 3 * 16 + 7] == codes[1, 3, 7, 5]  # L is row-major over the grid
    assert torch.equal(unitok.codes_from_reference(ref), codes)
    with pytest.raises(ValueError, match="not a square grid"):
        unitok.codes_from_reference(torch.zeros(1, 8, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected codes of shape \(B, H, W, k\)"):
        unitok.codes_to_reference(torch.zeros(8, 10))


def test_preprocess_matches_the_reference_transform():
    from PIL import Image

    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (90, 120, 3), dtype=np.uint8)
    out = unitok.preprocess(array, image_size=64)
    assert out.shape == (1, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    # by hand: shorter side 90 -> 72 (bicubic), centre crop 64, [-1, 1]
    img = Image.fromarray(array).resize((96, 72), Image.BICUBIC)
    left, top = (96 - 64) // 2, (72 - 64) // 2
    expected = np.asarray(img.crop((left, top, left + 64, top + 64)), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(out[0].permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert unitok.preprocess([Image.fromarray(array)] * 3, image_size=32).shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="expected uint8"):
        unitok.preprocess(array.astype(np.float32))
