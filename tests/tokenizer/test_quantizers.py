"""The quantizer study's contenders (unitok.tokenizer.quantizers) in the toolkit's token format. CPU, seconds.

Each contender's codes round-trip through `lookup` / `decode`, its straight-through gradient reaches the encoder,
its code vectors rebuild the latent as the generator and the unified model read it, bits per token are equal
across contenders, and bad settings are one-line errors.
"""
import dataclasses
import math
import subprocess
import sys

import pytest
import torch

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok import get_preset
from unitok.evaluation.codebook_stats import codebook_stats
from unitok.tokenizer.config import ModelConfig
from unitok.tokenizer.model import UniTok
from unitok.tokenizer.quantizers import QUANTIZERS, bits_per_token, build_quantizer, fsq_levels
from unitok.transformer.code_input import code_vectors

# a small tokenizer: 16 px, 4x4 tokens, 4 sub-codes of 16 codes (4 bits each, 16 bits per token)
SMALL = dict(image_size=16, patch_size=4, width=32, encoder_depth=1, decoder_depth=1, num_heads=2, latent_dim=8,
             num_codebooks=4, codebook_size=16, embed_dim=16, text_width=16, text_layers=1, text_heads=2,
             context_length=8)


def small_config(quantizer: str, **overrides) -> ModelConfig:
    values = {**SMALL, "quantizer": quantizer, **overrides}
    if quantizer == "lfq" and "latent_dim" not in overrides:
        values["latent_dim"] = 16   # one bit per dimension: 4 sub-codes x log2(16)
    return ModelConfig(**values)


def small_model(quantizer: str, seed: int = 0) -> UniTok:
    torch.manual_seed(seed)
    return UniTok(small_config(quantizer))


def images(n=6, seed=1):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("name", QUANTIZERS)
def test_codes_round_trip_through_lookup_and_decode(name):
    model = small_model(name).eval()
    x = images()
    with torch.no_grad():
        out = model.quantize(x)
        codes = model.encode(x)                                            # (B, 4, 4, k)
        assert codes.shape == (6, 4, 4, 4) and codes.dtype == torch.int64
        assert int(codes.min()) >= 0 and int(codes.max()) < 16
        # lookup(codes) gives the vectors the forward pass quantized to, so decode(encode(x)) == reconstruct(x)
        torch.testing.assert_close(model.quantizer.lookup(out.codes), out.z_q, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.decode(codes), model.reconstruct(x), atol=1e-5, rtol=1e-5)
        # re-encoding the looked-up latent picks the same codes: the codes name points the quantizer maps to itself
        # (not for residual VQ: greedy level-by-level search of a sum of codes may start from another first code)
        again = model.quantizer(model.quantizer.lookup(out.codes)).codes
    assert name == "rvq" or torch.equal(again, out.codes), name
    # counts are per sub-code, over this call's tokens
    assert out.counts.shape == (4, 16) and int(out.counts.sum()) == 6 * 16 * 4


@pytest.mark.parametrize("name", QUANTIZERS)
def test_code_vectors_rebuild_the_latent_as_consumers_read_it(name):
    # the generator and the unified model keep a copy of `codebook_vectors()` and rebuild the latent with
    # `code_vectors`: it must be what the tokenizer's own lookup gives
    model = small_model(name).eval()
    codes = torch.randint(0, 16, (5, 7, 4), generator=torch.Generator().manual_seed(2))
    books = model.quantizer.codebook_vectors().detach()
    assert books.shape[:2] == (4, 16)
    with torch.no_grad():
        expected = model.quantizer.lookup(codes)
    torch.testing.assert_close(code_vectors(books, codes, model.config.latent_dim), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", QUANTIZERS)
def test_straight_through_gradient_reaches_the_encoder(name):
    model = small_model(name).train()
    out = model(images(), ["a red circle"] * 6)
    # only the reconstruction: the gradient can reach the encoder through the quantizer's straight-through path
    out.reconstruction.square().mean().backward()
    grad = model.encoder.blocks[0].attn.qkv.weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0, name
    assert math.isfinite(out.vq_loss.item()), name


def test_bits_per_token_are_equal_across_the_study_settings():
    from unitok.studies.plan import STUDIES
    from unitok.studies.spec import Scale, resolve_overrides

    base = Scale().base_preset().model
    bits = {}
    for setting in STUDIES["quantizers"].settings:
        config = dataclasses.replace(base, **resolve_overrides(setting.overrides, base))
        model = UniTok(config).eval()
        with torch.no_grad():
            codes = model.encode(torch.zeros(1, 3, 32, 32))
        k, K = codes.shape[-1], model.quantizer.codebook_size
        bits[setting.name] = bits_per_token(k, K)
    assert sorted(bits) == sorted(QUANTIZERS)
    assert set(bits.values()) == {64.0}, bits


def test_fsq_levels_multiply_to_the_codebook_size():
    assert fsq_levels(small_config("fsq")) == (4, 4)                    # 16 codes over 2 dimensions
    assert fsq_levels(small_config("fsq", codebook_size=12)) == (4, 3)
    assert fsq_levels(small_config("fsq", latent_dim=16, codebook_size=64)) == (4, 4, 2, 2)
    assert fsq_levels(small_config("fsq", fsq_levels=(8, 2))) == (8, 2)
    model = UniTok(small_config("fsq", fsq_levels=(8, 2)))
    assert model.quantizer.codebook_vectors().shape == (4, 16, 2)


@pytest.mark.parametrize("overrides, message", [
    ({"quantizer": "vq2"}, "quantizer must be one of mcq, rvq, fsq, lfq, simvq, got 'vq2'"),
    ({"quantizer": "fsq", "fsq_levels": (4, 8)}, "fsq_levels (4, 8) give 32 codes (5.00 bits)"),
    ({"quantizer": "fsq", "fsq_levels": (16,)}, "expected 2 levels >= 2 whose product is codebook_size 16"),
    ({"quantizer": "fsq", "codebook_size": 7}, "fsq: codebook_size 7 cannot be spread over latent_dim / "
                                                "num_codebooks = 2 dimensions with at least 2 levels each"),
    ({"quantizer": "lfq"}, "lfq needs latent_dim = num_codebooks x log2(codebook_size) = 16"),
    ({"quantizer": "lfq", "codebook_size": 12}, "lfq needs codebook_size to be a power of 2"),
    ({"quantizer": "rvq", "entropy_weight": 0.1}, "entropy_weight applies to quantizer='mcq' only"),
    ({"quantizer": "mcq", "fsq_levels": (4, 4)}, "fsq_levels is for quantizer='fsq'"),
])
def test_bad_quantizer_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**SMALL, **overrides})
    text = str(info.value)
    assert message in text and "\n" not in text, text


def test_a_bad_quantizer_on_the_command_line_is_one_line():
    res = subprocess.run([sys.executable, "-m", "unitok.cli", "train", "--preset", "tiny", "--data", "shapes",
                          "--set", "quantizer=lfq", "--out", "/nonexistent/never-written"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "lfq needs latent_dim = num_codebooks x log2(codebook_size) = 64" in lines[0], lines


@pytest.mark.parametrize("name", ["rvq", "fsq"])
def test_statistics_mean_the_same_for_any_quantizer(name):
    # the codebook statistics read only (N, k) codes: MI between sub-codes is defined for every contender
    model = small_model(name).eval()
    with torch.no_grad():
        codes = model.encode(images(32))
    stats = codebook_stats(codes, model.quantizer.codebook_size)
    assert len(stats["codebook_usage"]) == 4 and stats["window_tokens"] == 32 * 16
    assert all(0 < u <= 1 for u in stats["codebook_usage"])
    mi = torch.tensor(stats["mutual_information"])
    assert mi.shape == (4, 4) and bool((mi >= 0).all())


@pytest.mark.parametrize("name", ["rvq", "lfq"])
def test_generator_and_unified_model_read_any_quantizer_s_codes(name):
    from unitok.generator.config import GeneratorConfig
    from unitok.generator.model import TokenGenerator
    from unitok.mllm.config import MLLMConfig
    from unitok.mllm.model import UnifiedModel
    from unitok.mllm.text import TextTokenizer

    tokenizer = small_model(name).eval()
    codes = torch.randint(0, 16, (2, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    gen = TokenGenerator(GeneratorConfig.preset("tiny", tokenizer, width=32, depth=1, num_heads=2, depth_width=32,
                                                depth_heads=2, image_input="codebook"), tokenizer).eval()
    assert gen.config.quantizer == name
    torch.testing.assert_close(code_vectors(gen.codebooks, codes.flatten(1, 2), gen.config.latent_dim),
                               tokenizer.quantizer.lookup(codes.flatten(1, 2)), atol=1e-5, rtol=1e-5)
    text = TextTokenizer.train(["a red circle", "a blue square on the left"], num_merges=20)
    config = MLLMConfig.for_tokenizer(tokenizer, text, width=32, depth=1, num_heads=2, depth_width=32,
                                      depth_heads=2, image_input="codebook")
    mllm = UnifiedModel(config, tokenizer, text).eval()
    assert mllm.config.quantizer == name
    with torch.no_grad():
        embedded = mllm.embed_image(codes.flatten(1, 2))
    assert embedded.shape == (2, 16, 32) and bool(torch.isfinite(embedded).all())
