"""The released UniTok checkpoint: read it, build the model it describes, load it key for key.

    >>> model = load_reference("unitok_tokenizer.pth")                   # or the hub repo id (downloaded, cached)
    >>> codes = model.encode(preprocess([pil_image]))                      # (1, 16, 16, 8)
    >>> ref_codes = codes_to_reference(codes)                              # (1, 8, 256): the reference's layout

    $ unitok convert unitok_tokenizer.pth models/unitok-large              # config.json + model.safetensors

The file (`unitok_tokenizer.pth` in the Hugging Face repo `FoundationVision/unitok_tokenizer`) is a `torch.save`
dict `{"args": {...}, "epoch", "iter", "trainer": {"unitok": state_dict, ...}}`; `args` holds the training flags
(model name, image size, codebook sizes, text tower sizes, ...) but not the depths, which are counted from the state
dict, together with every conv width, so shallower or narrower variants of the same layout load too.

It is read with `torch.load(weights_only=True)`: only tensors, plain containers and `torch.dtype`s are unpickled
(the `args` dict holds a `torch.dtype`, which PyTorch's safe unpickler accepts as it is).

Key mapping (everything else is identical, and every key must be used exactly once):
    quantizer.codebooks.{i}.codebook.weight (K, d)  -> stacked into quantizer.codebooks (k, K, d)
    quantizer.codebooks.{i}.vocab_usage (K,)        -> dropped (a usage EMA, not used by inference); shape checked
    {quant_proj,post_quant_proj}.attn.zero_k_bias   -> dropped; must be all zeros (it is a constant buffer)
    encoder.pos_embed (1, 1, width)                 -> dropped; must be all zeros (the reference has no positions)
"""
from __future__ import annotations

import math
import os
import pickle
import re
from pathlib import Path
from typing import Any, Dict, Tuple, Union

import torch

from .config import ModelConfig
from .model import UniTok

REFERENCE_REPO = "FoundationVision/unitok_tokenizer"
REFERENCE_FILE = "unitok_tokenizer.pth"
EXTERNAL_REPO = "FoundationVision/unitok_external"  # the loss networks' weights (see docs/reference_checkpoint.md)
ENV_VAR = "UNITOK_REFERENCE"                          # a path to unitok_tokenizer.pth, checked before the hub cache

PathLike = Union[str, os.PathLike]
_CODEBOOK = re.compile(r"quantizer\.codebooks\.(\d+)\.(codebook\.weight|vocab_usage)$")


# ---------------------------------------------------------------------------------------------------------------
# finding and reading the file
# ---------------------------------------------------------------------------------------------------------------
def resolve_reference(path_or_repo: PathLike = REFERENCE_REPO, filename: str = REFERENCE_FILE) -> Path:
    """A local path to the checkpoint: the path itself, or the file from a Hugging Face repo (cache first).

    Raises FileNotFoundError naming the file, where to get it and where to put it when neither works.
    """
    text = os.fspath(path_or_repo)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.is_dir() and (path / filename).is_file():
        return path / filename
    looks_like_repo = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None and not text.endswith((".pth", ".pt"))
    if not looks_like_repo or path.exists():
        raise FileNotFoundError(f"{text}: no such checkpoint file; expected the reference's {filename} (a torch.save "
                                f"dict with 'args' and 'trainer'), or a Hugging Face repo id such as {REFERENCE_REPO}")
    from huggingface_hub import hf_hub_download

    try:  # the cache first: works offline once the file has been downloaded
        return Path(hf_hub_download(text, filename, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(hf_hub_download(text, filename))
    except Exception as e:  # offline, no such repo, or no access: say what to do, whatever the exact cause
        raise FileNotFoundError(
            f"could not get {filename} from the Hugging Face repo {text} ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no details'}). On a machine with internet access run "
            f"`huggingface-cli download {text} {filename}` (it fills the cache in ~/.cache/huggingface, which works "
            f"offline afterwards), or download https://huggingface.co/{text}/resolve/main/{filename} anywhere and "
            f"pass its path (or set {ENV_VAR}=/path/to/{filename}).") from None


def find_reference() -> Path | None:
    """The released checkpoint if it is already on this machine ($UNITOK_REFERENCE or the hub cache), else None.

    Never downloads; for notebooks and examples that fall back to a random model when the file is absent.
    """
    env = os.environ.get(ENV_VAR)
    if env and Path(env).expanduser().is_file():
        return Path(env).expanduser()
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(REFERENCE_REPO, REFERENCE_FILE)
    except Exception:
        return None
    return Path(cached) if isinstance(cached, str) and Path(cached).is_file() else None


def read_reference(path: PathLike) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(args, state_dict) from a reference checkpoint file, unpickling nothing but tensors and plain data.

    Raises ValueError when the file is not such a checkpoint, saying what was expected and what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; expected the reference checkpoint {REFERENCE_FILE}")
    try:
        try:  # memory-mapped: the tensors are read when copied into the model, not all at once up front
            blob = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # a file in torch's legacy (non-zip) format cannot be mapped
            blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # a Python object the safe unpickler refuses (it names the global)
        lines = str(e).strip().splitlines()
        detail = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line),
                      lines[0] if lines else type(e).__name__)
        raise ValueError(
            f"{path}: cannot be read safely with torch.load(weights_only=True) ({detail}). Expected the "
            f"reference's {REFERENCE_FILE}: a dict of tensors and plain values. A file holding other Python objects "
            f"is not that checkpoint, or was re-saved with them; re-save it as "
            f"{{'args': dict, 'trainer': {{'unitok': state_dict}}}} from a trusted environment.") from None
    except Exception as e:  # not a torch.save file at all, or a truncated / damaged one
        raise ValueError(f"{path}: is not a readable torch checkpoint ({type(e).__name__}: "
                         f"{(str(e).strip().splitlines() or [''])[0]}); expected the reference's {REFERENCE_FILE} "
                         f"(download it again if it is truncated)") from None
    if not isinstance(blob, dict):
        raise ValueError(f"{path}: expected a dict with 'args' and 'trainer' (the reference checkpoint), got "
                         f"{type(blob).__name__}")
    if "args" not in blob or not isinstance(blob["args"], dict):
        raise ValueError(f"{path}: expected a dict with an 'args' dict of training flags, got keys {sorted(blob)[:8]}"
                         f"{' with args of type ' + type(blob['args']).__name__ if 'args' in blob else ''}")
    trainer = blob.get("trainer")
    state = trainer.get("unitok") if isinstance(trainer, dict) else None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected blob['trainer']['unitok'] to be a state dict of tensors, got "
                         f"{type(trainer).__name__ if not isinstance(trainer, dict) else type(state).__name__}")
    return dict(blob["args"]), dict(state)


# ---------------------------------------------------------------------------------------------------------------
# the architecture from args + state dict
# ---------------------------------------------------------------------------------------------------------------
def _count(state: dict, pattern: str) -> int:
    """How many consecutive indices i have a key matching pattern.format(i) (0, 1, 2, ... without gaps)."""
    n = 0
    while pattern.format(n) in state:
        n += 1
    return n


def _shape(state: dict, key: str) -> tuple:
    if key not in state:
        raise ValueError(f"reference checkpoint: key {key!r} is missing; expected the released UniTok layout "
                         f"(see docs/reference_checkpoint.md)")
    return tuple(state[key].shape)


def config_from_reference(args: Dict[str, Any], state: Dict[str, torch.Tensor] | None = None,
                          **overrides) -> ModelConfig:
    """ModelConfig for a reference checkpoint: `args` where it speaks, the state dict for depths and widths.

    Where both say something (latent size, codebooks, text tower) they must agree, else a ValueError names both.
    Without a state dict, the named size's depths and widths (31 blocks for vitamin_large) are used.
    `overrides` set ModelConfig fields afterwards (e.g. projection_causal=True, num_heads=...).
    """
    from .vitamin import VITAMIN_SIZES

    if state is None:
        return _config_from_args_only(args, **overrides)

    model = args.get("model", "vitamin_large")
    if model not in VITAMIN_SIZES:
        raise ValueError(f"reference args: model={model!r} is not supported; expected one of {sorted(VITAMIN_SIZES)}")
    if args.get("quant_proj", "attn") != "attn":
        raise ValueError(f"reference args: quant_proj={args.get('quant_proj')!r} is not supported; only the attention "
                         f"projection ('attn', the released model's) is mapped")
    if int(args.get("num_query", 0) or 0):
        raise ValueError(f"reference args: num_query={args['num_query']} register tokens are not supported; expected 0")
    problems = []

    def agree(name, from_args, from_state):
        if from_args is not None and from_state is not None and int(from_args) != int(from_state):
            problems.append(f"{name}: args say {from_args}, the state dict has {from_state}")
        value = from_args if from_args is not None else from_state
        return int(value) if value is not None else None

    width = _shape(state, "encoder.norm.weight")[0]
    stem = _shape(state, "encoder.patch_embed.backbone.stem.conv1.weight")[0]
    stages = "encoder.patch_embed.backbone.stages.{}.0.conv3_1x1.weight"
    conv_widths = (stem, _shape(state, stages.format(0))[0], _shape(state, stages.format(1))[0])
    conv_depths = tuple(_count(state, f"encoder.patch_embed.backbone.stages.{s}.{{}}.pre_norm.weight")
                        for s in (0, 1))
    dec_widths = (_shape(state, "decoder.up_conv1.conv.weight")[0],
                  _shape(state, "decoder.up_conv3.0.conv3_1x1.weight")[0])
    dec_depths = tuple(_count(state, f"decoder.up_conv{s}.{{}}.pre_norm.weight") for s in (2, 3))
    mlp_ratio = _shape(state, "encoder.blocks.0.mlp.w0.weight")[0] / width  # GeGLU hidden / width: 2 released
    encoder_depth = _count(state, "encoder.blocks.{}.norm1.weight")
    decoder_depth = _count(state, "decoder.blocks.{}.norm1.weight")
    named = VITAMIN_SIZES[model]
    # heads are not visible in the weights: the named size's, else head dim 64 as in both named sizes
    num_heads = named["num_heads"] if width == named["width"] else max(1, width // 64)

    cb = "quantizer.codebooks.{}.codebook.weight"
    k_state = _count(state, cb)
    K_state, d_state = _shape(state, cb.format(0)) if k_state else (None, None)
    num_codebooks = agree("num_codebooks", args.get("num_codebooks"), k_state or None)
    latent_dim = agree("vocab_width", args.get("vocab_width"), _shape(state, "quant_proj.proj.weight")[0])
    total = args.get("vocab_size")
    codebook_size = agree("codebook size (vocab_size / num_codebooks)",
                          None if total is None else int(total) // max(1, num_codebooks), K_state)
    if d_state is not None and num_codebooks and d_state * num_codebooks != latent_dim:
        problems.append(f"codebook width {d_state} x {num_codebooks} codebooks != vocab_width {latent_dim}")
    embed_dim = agree("embed_dim", args.get("embed_dim"), _shape(state, "projection.weight")[0])
    text_width = agree("text_width", args.get("text_width"), _shape(state, "text_encoder.token_embedding.weight")[1])
    text_vocab = agree("text_vocab_size", args.get("text_vocab_size"),
                       _shape(state, "text_encoder.token_embedding.weight")[0])
    context = agree("text_context_length", args.get("text_context_length"),
                    _shape(state, "text_encoder.positional_embedding")[0])
    text_layers = agree("text_layers", args.get("text_layers"),
                        _count(state, "text_encoder.transformer.resblocks.{}.ln_1.weight"))
    text_heads = int(args.get("text_heads") or max(1, text_width // 64))
    if problems:
        raise ValueError("reference checkpoint: args and state dict disagree: " + "; ".join(problems))
    values = dict(
        image_size=int(args.get("img_size", 256)), patch_size=16, encoder=model, decoder="vitamin",
        projection="attn_reference", width=width, encoder_depth=encoder_depth, decoder_depth=decoder_depth,
        num_heads=num_heads, mlp="geglu", mlp_ratio=mlp_ratio, conv_widths=conv_widths, conv_depths=conv_depths,
        decoder_conv_widths=dec_widths, decoder_conv_depths=dec_depths, fc_norm_eps=1e-6,
        latent_dim=latent_dim, num_codebooks=num_codebooks, codebook_size=codebook_size,
        beta=float(args.get("vq_beta", 0.25)), entropy_weight=float(args.get("le", 0.0) or 0.0),
        entropy_temperature=float(args.get("e_temp", 0.01) or 0.01),
        embed_dim=embed_dim, text_width=text_width, text_layers=text_layers, text_heads=text_heads,
        context_length=context, vocab_size=text_vocab)
    unknown = sorted(set(overrides) - set(ModelConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown ModelConfig overrides {unknown}")
    values.update(overrides)
    return ModelConfig(**values)


def _config_from_args_only(args: Dict[str, Any], **overrides) -> ModelConfig:
    from .vitamin import VITAMIN_SIZES

    model = args.get("model", "vitamin_large")
    if model not in VITAMIN_SIZES:
        raise ValueError(f"reference args: model={model!r} is not supported; expected one of {sorted(VITAMIN_SIZES)}")
    named = VITAMIN_SIZES[model]
    depth = {"vitamin_base": 14, "vitamin_large": 31}[model]
    num_codebooks = int(args.get("num_codebooks", 8))
    text_width = int(args.get("text_width", 768))
    values = dict(
        image_size=int(args.get("img_size", 256)), patch_size=16, encoder=model, decoder="vitamin",
        projection="attn_reference", width=named["width"], encoder_depth=depth, decoder_depth=depth,
        num_heads=named["num_heads"], mlp="geglu", mlp_ratio=2.0, fc_norm_eps=1e-6,
        latent_dim=int(args.get("vocab_width", 64)), num_codebooks=num_codebooks,
        codebook_size=int(args.get("vocab_size", 32768)) // num_codebooks, beta=float(args.get("vq_beta", 0.25)),
        entropy_weight=float(args.get("le", 0.0) or 0.0), entropy_temperature=float(args.get("e_temp", 0.01) or 0.01),
        embed_dim=int(args.get("embed_dim", 768)), text_width=text_width,
        text_layers=int(args.get("text_layers", 12)), text_heads=int(args.get("text_heads", text_width // 64)),
        context_length=int(args.get("text_context_length", 77)), vocab_size=int(args.get("text_vocab_size", 49408)))
    values.update(overrides)
    return ModelConfig(**values)


def reference_to_state_dict(state: Dict[str, torch.Tensor], config: ModelConfig) -> Dict[str, torch.Tensor]:
    """The reference state dict in this package's names (see the module docstring); every key is accounted for.

    Raises ValueError when a dropped buffer is not what it must be, or codebooks are missing or mis-shaped.
    """
    out, books, problems = {}, {}, []
    for key, value in state.items():
        m = _CODEBOOK.match(key)
        if m:
            i = int(m.group(1))
            if m.group(2) == "codebook.weight":
                books[i] = value
            elif tuple(value.shape) != (config.codebook_size,):
                problems.append(f"{key}: expected a ({config.codebook_size},) usage buffer, got {tuple(value.shape)}")
            continue
        if key.endswith("attn.zero_k_bias") or key == "encoder.pos_embed":
            if value.numel() and bool(value.float().abs().max() > 0):
                problems.append(f"{key}: expected an all-zero buffer (it is dropped), got max |x| = "
                                f"{float(value.float().abs().max()):.3g}")
            if key == "encoder.pos_embed" and tuple(value.shape) != (1, 1, config.width):
                problems.append(f"{key}: expected shape (1, 1, {config.width}), got {tuple(value.shape)}")
            continue
        if key == "logit_scale" and value.numel() == 1:
            value = value.reshape(())
        out[key] = value
    if sorted(books) != list(range(config.num_codebooks)):
        problems.append(f"expected codebooks 0..{config.num_codebooks - 1}, found {sorted(books)}")
    elif any(tuple(b.shape) != (config.codebook_size, config.latent_dim // config.num_codebooks)
             for b in books.values()):
        problems.append(f"codebooks must be ({config.codebook_size}, {config.latent_dim // config.num_codebooks}), "
                        f"got {sorted({tuple(b.shape) for b in books.values()})}")
    if problems:
        raise ValueError("reference checkpoint: " + "; ".join(problems))
    out["quantizer.codebooks"] = torch.stack([books[i] for i in range(config.num_codebooks)])
    return out


def load_reference(path_or_repo: PathLike = REFERENCE_REPO, map_location: str = "cpu", **overrides) -> UniTok:
    """The released UniTok (a `.pth` file, or a Hugging Face repo id) with the reference checkpoint's weights,
    computing what the reference computes (see the module docstring), in eval mode on `map_location`.

    overrides: ModelConfig fields to change, e.g. `projection_causal=True` for the Feb-2025 release.
    Strict: any key left over or missing, or any shape that differs, is a ValueError listing them all."""
    from ..checkpoint import load_state_dict_checked

    path = resolve_reference(path_or_repo)
    args, state = read_reference(path)
    config = config_from_reference(args, state, **overrides)
    mapped = reference_to_state_dict(state, config)
    model = UniTok(config)
    try:
        load_state_dict_checked(model, mapped)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return model.to(map_location).eval()


# ---------------------------------------------------------------------------------------------------------------
# writing the reference format (tests, and handing a model to the reference's own tools)
# ---------------------------------------------------------------------------------------------------------------
def to_reference_checkpoint(model) -> dict:
    """A reference-layout UniTok as the reference's checkpoint dict {'args', 'epoch', 'iter', 'trainer'}.

    The inverse of `load_reference` (codebooks unstacked, the zero buffers and usage EMA put back).
    """
    cfg = model.config
    if cfg.decoder != "vitamin" or cfg.projection != "attn_reference" or not cfg.encoder.startswith("vitamin_"):
        raise ValueError("only the reference layout can be written in the reference format; expected "
                         f"encoder='vitamin_base'/'vitamin_large', decoder='vitamin', projection='attn_reference', "
                         f"got {cfg.encoder!r}, {cfg.decoder!r}, {cfg.projection!r}")
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().cpu().clone()
        if key == "quantizer.codebooks":
            for i, book in enumerate(value):
                state[f"quantizer.codebooks.{i}.codebook.weight"] = book.clone()
                state[f"quantizer.codebooks.{i}.vocab_usage"] = torch.zeros(cfg.codebook_size)
            continue
        state[key] = value
        if key.endswith("attn.q_bias"):
            state[key.replace("q_bias", "zero_k_bias")] = torch.zeros_like(value)
    state["encoder.pos_embed"] = torch.zeros(1, 1, cfg.width)
    args = dict(model=cfg.encoder, img_size=cfg.image_size, resize_ratio=1.125,
                vocab_size=cfg.codebook_size * cfg.num_codebooks, vocab_width=cfg.latent_dim,
                num_codebooks=cfg.num_codebooks, quant_proj="attn", vq_beta=cfg.beta, le=cfg.entropy_weight,
                e_temp=cfg.entropy_temperature, num_query=0, embed_dim=cfg.embed_dim, text_width=cfg.text_width,
                text_heads=cfg.text_heads, text_layers=cfg.text_layers, text_vocab_size=cfg.vocab_size,
                text_context_length=cfg.context_length, drop_path=0.0, grad_ckpt=False, dtype=torch.float32)
    return {"args": args, "epoch": 0, "iter": 0, "trainer": {"unitok": state}}


# ---------------------------------------------------------------------------------------------------------------
# codes and images in the reference's conventions
# ---------------------------------------------------------------------------------------------------------------
def codes_to_reference(codes: torch.Tensor) -> torch.Tensor:
    """(B, H, W, k) codes -> (B, k, L) with L = H*W row-major: the reference's (and LlamaGen-style tools') layout."""
    if not isinstance(codes, torch.Tensor) or codes.ndim != 4:
        raise ValueError(f"expected codes of shape (B, H, W, k), got {tuple(getattr(codes, 'shape', ()))}")
    return codes.flatten(1, 2).transpose(1, 2).contiguous()


def codes_from_reference(codes: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """(B, k, L) codes in the reference's layout -> (B, H, W, k), H = W = grid (default sqrt(L))."""
    if not isinstance(codes, torch.Tensor) or codes.ndim != 3:
        raise ValueError(f"expected reference codes of shape (B, k, L), got {tuple(getattr(codes, 'shape', ()))}")
    B, k, L = codes.shape
    grid = grid or math.isqrt(L)
    if grid * grid != L:
        raise ValueError(f"reference codes have L={L} tokens, which is not a square grid; pass grid=")
    return codes.transpose(1, 2).reshape(B, grid, grid, k).contiguous()


def preprocess(images, image_size: int = 256, resize_ratio: float = 1.125) -> torch.Tensor:
    """The reference's inference transform: PIL images / HxWx3 uint8 arrays -> (B, 3, S, S) in [-1, 1].

    Resize the shorter side to int(image_size * resize_ratio) (bicubic), centre-crop image_size, scale to [-1, 1].
    A single image gives B = 1.
    """
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    if isinstance(images, (Image.Image, np.ndarray)):
        images = [images]
    transform = transforms.Compose([
        transforms.Resize(int(image_size * resize_ratio), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.ToTensor(),
        transforms.Normalize([0.5] * 3, [0.5] * 3),
    ])
    out = []
    for img in images:
        if isinstance(img, np.ndarray):
            if img.dtype != np.uint8:
                raise ValueError(f"expected uint8 HxWx3 arrays (0-255), got {img.dtype}")
            img = Image.fromarray(img if img.ndim == 3 else np.stack([img] * 3, -1))
        if not isinstance(img, Image.Image):
            raise ValueError(f"expected PIL images or uint8 arrays, got {type(img).__name__}")
        out.append(transform(img.convert("RGB")))
    return torch.stack(out)


__all__ = ["REFERENCE_REPO", "REFERENCE_FILE", "EXTERNAL_REPO", "ENV_VAR", "resolve_reference", "find_reference",
           "read_reference", "config_from_reference", "reference_to_state_dict", "load_reference",
           "to_reference_checkpoint", "codes_to_reference", "codes_from_reference", "preprocess"]
