"""Tests for unitok.tokenizer.quantizer.MultiCodebookQuantizer (MCQ). CPU, a few seconds.

The centre piece is a property test: the vectorised, block-chunked quantizer must agree with a plain Python loop
over sub-codebooks written here straight from the equations in docs/method.md (per chunk: L2-normalise chunk and
codes, cosine argmax, straight-through `z + sg(c - z)`, loss `beta * mse(sg(c), z) + mse(c, sg(z))`, averaged
over the k chunks) -- codes, z_q, loss, and the gradients w.r.t. z and the codebooks.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import unitok  # noqa: F401  (first: makes torchvision importable on CPU-only torch)
from unitok.tokenizer.quantizer import MultiCodebookQuantizer, QuantizerOutput

HYPOTHESIS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def make_quantizer(dim=16, k=4, K=32, seed=0, **kwargs) -> MultiCodebookQuantizer:
    torch.manual_seed(seed)
    q = MultiCodebookQuantizer(dim, k, K, **kwargs)
    with torch.no_grad():  # spread the codes out (the reference init is a tiny uniform box; only directions matter)
        q.codebooks.normal_()
    return q


# ---------------------------------------------------------------------------------------------------------------
# The reference: one plain loop over sub-codebooks, from the equations in docs/method.md


def reference_mcq(z: torch.Tensor, codebooks: torch.Tensor, beta: float):
    """z (..., dim), codebooks (k, K, d) -> (z_q (..., dim), codes (..., k), loss ()), one sub-codebook at a time."""
    k, K, d = codebooks.shape
    lead = z.shape[:-1]
    chunks = z.reshape(-1, k, d)
    z_q, codes, losses = [], [], []
    for i in range(k):
        zi = F.normalize(chunks[:, i], dim=-1)                   # (N, d) unit-norm chunk
        ci = F.normalize(codebooks[i], dim=-1)                   # (K, d) unit-norm codes
        idx = (zi @ ci.T).argmax(dim=-1)                         # cosine similarity argmax
        hat = ci[idx]                                            # (N, d) the chosen code, unit norm
        losses.append(beta * ((hat.detach() - zi) ** 2).mean() + ((hat - zi.detach()) ** 2).mean())
        z_q.append(zi + (hat - zi).detach())                     # straight-through
        codes.append(idx)
    z_q = torch.stack(z_q, dim=1).reshape(*lead, k * d)
    codes = torch.stack(codes, dim=1).reshape(*lead, k)
    return z_q, codes, torch.stack(losses).mean()


def textbook_cosine_vq(z: torch.Tensor, codebook: torch.Tensor, beta: float):
    """The k = 1 baseline: an ordinary cosine-similarity VQ, z (N, d), codebook (K, d)."""
    z_n = F.normalize(z, dim=-1)
    c_n = F.normalize(codebook, dim=-1)
    idx = torch.argmax(z_n @ c_n.T, dim=1)
    hat = c_n[idx]
    loss = beta * F.mse_loss(z_n, hat.detach()) + F.mse_loss(hat, z_n.detach())
    return z_n + (hat - z_n).detach(), idx, loss


# ---------------------------------------------------------------------------------------------------------------
# Interface


@pytest.mark.parametrize("lead", [(), (7,), (2, 5), (2, 3, 4), (1, 1, 1, 3)])
def test_interface_shapes_and_types(lead):
    q = make_quantizer(dim=24, k=3, K=10)
    assert isinstance(q.codebooks, torch.nn.Parameter) and q.codebooks.shape == (3, 10, 8)
    assert [name for name, _ in q.named_parameters()] == ["codebooks"]
    z = torch.randn(*lead, 24)
    out = q(z)
    assert isinstance(out, QuantizerOutput)
    assert out.z_q.shape == z.shape and out.z_q.dtype == torch.float32
    assert out.codes.shape == (*lead, 3) and out.codes.dtype == torch.int64
    assert out.loss.shape == () and out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert out.counts.shape == (3, 10) and out.counts.dtype == torch.int64
    assert out.entropy_loss is None
    n_tokens = math.prod(lead)
    assert ((out.codes >= 0) & (out.codes < 10)).all()
    assert torch.equal(out.counts.sum(1), torch.full((3,), n_tokens))          # every token counted once per codebook
    flat = out.codes.reshape(-1, 3)
    expected = torch.stack([torch.bincount(flat[:, i], minlength=10) for i in range(3)])
    assert torch.equal(out.counts, expected)


def test_codebook_init_is_the_references():
    q = MultiCodebookQuantizer(64, 8, 4096)
    bound = 8 ** -0.5 / 36
    assert q.codebooks.shape == (8, 4096, 8)
    assert q.codebooks.abs().max() <= bound and q.codebooks.abs().max() > 0.9 * bound
    assert q.beta == 0.25


def test_lookup_matches_z_q_to_rounding():
    """lookup(codes) returns the unit-norm codes; forward returns them through the straight-through expression
    `chunk + (code - chunk).detach()`, which equals the code only up to one rounding of the add/subtract
    (|difference| <= 1 ulp of values <= 1, i.e. <= 2**-24 ~ 6e-8). So the two agree to ~1e-7, not bit for bit --
    see test_lookup_is_bit_identical_to_z_q for the documented (stronger) claim."""
    q = make_quantizer(dim=64, k=8, K=128)
    z = torch.randn(4, 100, 64)
    out = q(z)
    looked_up = q.lookup(out.codes)
    assert looked_up.shape == out.z_q.shape
    torch.testing.assert_close(looked_up, out.z_q.detach(), rtol=0, atol=2 ** -23)
    # and lookup is exactly the normalised code vectors, bit for bit
    norm = F.normalize(q.codebooks.detach(), dim=-1)
    expected = torch.stack([norm[i][out.codes[..., i]] for i in range(8)], dim=-2).reshape(4, 100, 64)
    assert torch.equal(looked_up, expected)


def test_lookup_is_bit_identical_to_z_q():
    q = make_quantizer(dim=64, k=8, K=128)
    out = q(torch.randn(4, 100, 64))
    assert torch.equal(q.lookup(out.codes), out.z_q)


def test_z_q_chunks_have_unit_norm():
    q = make_quantizer(dim=30, k=5, K=17)
    out = q(torch.randn(3, 11, 30) * 5)
    norms = out.z_q.detach().reshape(3, 11, 5, 6).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=1e-6)


def test_straight_through_gradient_is_the_normalisation_gradient():
    q = make_quantizer(dim=24, k=4, K=9)
    z = torch.randn(5, 24, requires_grad=True)
    weights = torch.randn(5, 24)
    (q(z).z_q * weights).sum().backward()
    z2 = z.detach().clone().requires_grad_(True)
    (F.normalize(z2.reshape(5, 4, 6), dim=-1).reshape(5, 24) * weights).sum().backward()
    # the same autograd graph (normalise, then identity through the straight-through add): equal bit for bit
    assert torch.equal(z.grad, z2.grad)
    z.grad = None
    z2.grad = None
    q(z).z_q.sum().backward()
    F.normalize(z2.reshape(5, 4, 6), dim=-1).sum().backward()
    assert torch.equal(z.grad, z2.grad)
    # z_q carries no gradient to the codebooks: those learn from the codebook term of the loss only
    q.codebooks.grad = None
    q(z).z_q.sum().backward()
    assert q.codebooks.grad is None or not q.codebooks.grad.any()


# ---------------------------------------------------------------------------------------------------------------
# Property test: vectorised == per-sub-codebook loop


@st.composite
def configurations(draw):
    k = draw(st.integers(1, 6))
    d = draw(st.integers(1, 6))
    K = draw(st.integers(1, 40))
    lead = tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=3)))
    beta = draw(st.sampled_from([0.0, 0.1, 0.25, 1.0, 2.5]))
    # blocks of 1 .. 4 tokens (the block is search_block_elements // (k * K) tokens), so several blocks run
    block_elements = draw(st.integers(1, 4 * k * K))
    seed = draw(st.integers(0, 2 ** 16))
    return k, d, K, lead, beta, block_elements, seed


@HYPOTHESIS
@given(configurations())
def test_vectorised_equals_reference_loop(cfg):
    k, d, K, lead, beta, block_elements, seed = cfg
    q = make_quantizer(dim=k * d, k=k, K=K, seed=seed, beta=beta, search_block_elements=block_elements)
    gen = torch.Generator().manual_seed(seed + 1)
    z_data = torch.randn(*lead, k * d, generator=gen) * 3
    upstream = torch.randn(*lead, k * d, generator=gen)

    z = z_data.clone().requires_grad_(True)
    out = q(z)
    (out.loss + (out.z_q * upstream).sum()).backward()

    z_ref = z_data.clone().requires_grad_(True)
    codebooks_ref = q.codebooks.detach().clone().requires_grad_(True)
    ref_z_q, ref_codes, ref_loss = reference_mcq(z_ref, codebooks_ref, beta)
    (ref_loss + (ref_z_q * upstream).sum()).backward()

    assert torch.equal(out.codes, ref_codes)
    torch.testing.assert_close(out.z_q, ref_z_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.codebooks.grad, codebooks_ref.grad, rtol=1e-4, atol=1e-6)


def test_ties_break_like_argmax():
    """code_dim = 1: every cosine similarity is exactly +-1, so all codes of one sign tie; like torch.argmax (and the
    loop above) the first maximal index must win, whatever the block size."""
    for block in (1, 3, 1 << 18):
        q = make_quantizer(dim=4, k=4, K=7, search_block_elements=block)
        z = torch.randn(9, 4)
        _, ref_codes, _ = reference_mcq(z, q.codebooks.detach(), 0.25)
        assert torch.equal(q(z).codes, ref_codes)


@pytest.mark.parametrize("N", [1, 33])
def test_single_codebook_is_a_textbook_cosine_vq(N):
    q = make_quantizer(dim=12, k=1, K=50, search_block_elements=50 * 4)
    z = torch.randn(N, 12, requires_grad=True)
    out = q(z)
    z2 = z.detach().clone().requires_grad_(True)
    ref_z_q, ref_idx, ref_loss = textbook_cosine_vq(z2, q.codebooks[0], 0.25)
    assert out.codes.shape == (N, 1)
    assert torch.equal(out.codes[:, 0], ref_idx)
    torch.testing.assert_close(out.z_q, ref_z_q, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=0)
    out.loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(z.grad, z2.grad)


def test_loss_is_the_reference_loss_averaged_over_sub_codebooks():
    """Spell the loss out once more in closed form: for unit vectors |c - z|^2 = 2 - 2 cos, so the loss is
    (1 + beta) * mean over chunks of (2 - 2 max_j cos(z_i, c_ij)) / d."""
    q = make_quantizer(dim=20, k=4, K=16, beta=0.25)
    z = torch.randn(6, 20)
    out = q(z)
    chunks = F.normalize(z.reshape(6, 4, 5), dim=-1)
    codes = F.normalize(q.codebooks.detach(), dim=-1)
    best_cos = torch.einsum("nkd,kcd->nkc", chunks, codes).max(-1).values    # (6, 4)
    expected = 1.25 * ((2 - 2 * best_cos) / 5).mean()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# Precision


def test_fp32_under_bf16_autocast():
    q = make_quantizer(dim=64, k=8, K=256)
    z = torch.randn(2, 64, 64)
    ref = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = q(z)
        auto_from_linear = q(torch.nn.functional.linear(z, torch.eye(64)))  # a bf16 activation, as in the model
    assert auto.loss.dtype == torch.float32 and auto.z_q.dtype == torch.float32
    assert torch.equal(auto.codes, ref.codes)
    assert torch.equal(auto.loss, ref.loss)
    assert torch.equal(auto.z_q, ref.z_q)
    # a bf16 input is itself rounded, but the quantizer still computes in fp32 on it
    assert auto_from_linear.loss.dtype == torch.float32
    assert torch.equal(auto_from_linear.codes, q(z.bfloat16().float()).codes)
    # a bf16 input outside autocast: fp32 loss, the codes of its fp32 value
    zb = z.bfloat16()
    out_b = q(zb)
    assert out_b.loss.dtype == torch.float32 and torch.equal(out_b.codes, q(zb.float()).codes)


# ---------------------------------------------------------------------------------------------------------------
# Bad input


def test_dim_not_divisible_raises():
    with pytest.raises(ValueError, match=r"dim \(10\).*divisible.*num_codebooks \(4\)"):
        MultiCodebookQuantizer(10, 4, 8)
    with pytest.raises(ValueError, match="codebook_size"):
        MultiCodebookQuantizer(8, 4, 0)


def test_wrong_last_dim_raises():
    q = make_quantizer(dim=16, k=4, K=8)
    with pytest.raises(ValueError, match=r"\(\.\.\., 16\).*\(2, 3, 12\)"):
        q(torch.randn(2, 3, 12))


@pytest.mark.parametrize("codes, pattern", [
    (torch.zeros(2, 3, dtype=torch.long), r"\(\.\.\., 4\).*\(2, 3\)"),             # wrong k
    (torch.zeros(2, 5, dtype=torch.long), r"\(\.\.\., 4\).*\(2, 5\)"),
    (torch.tensor([[0, 1, -1, 2]]), r"\[0, 8\).*-1"),                                # negative
    (torch.tensor([[0, 1, 8, 2]]), r"\[0, 8\).*8"),                                  # == K
    (torch.tensor([[0, 1, 2, 3]], dtype=torch.float32), r"integer.*float32"),         # float codes
    (torch.tensor([[True, False, True, False]]), r"integer.*bool"),
    ([[0, 1, 2, 3]], r"integer.*list"),
])
def test_bad_codes_raise(codes, pattern):
    q = make_quantizer(dim=16, k=4, K=8)
    with pytest.raises(ValueError, match=pattern):
        q.lookup(codes)


def test_lookup_accepts_any_integer_dtype_and_shape():
    q = make_quantizer(dim=16, k=4, K=8)
    codes = torch.randint(0, 8, (2, 3, 4))
    for dtype in (torch.int16, torch.int32, torch.int64, torch.uint8):
        assert torch.equal(q.lookup(codes.to(dtype)), q.lookup(codes))
    assert q.lookup(codes[0, 0]).shape == (16,)
    assert q.lookup(torch.empty(0, 4, dtype=torch.long)).shape == (0, 16)


# ---------------------------------------------------------------------------------------------------------------
# Options: entropy loss, dead-code restart


def test_entropy_loss_option():
    z = torch.randn(3, 10, 16, requires_grad=True)
    plain = make_quantizer(dim=16, k=4, K=12, seed=3)
    ent = make_quantizer(dim=16, k=4, K=12, seed=3, entropy_weight=0.5, entropy_temperature=0.05)
    assert torch.equal(plain.codebooks, ent.codebooks)
    out_plain, out = plain(z), ent(z)
    assert out_plain.entropy_loss is None
    assert out.entropy_loss is not None and out.entropy_loss.shape == () and torch.isfinite(out.entropy_loss)
    # per-token entropy minus entropy of the mean, both within [0, ln K]
    assert -math.log(12) - 1e-5 <= out.entropy_loss.item() <= math.log(12) + 1e-5
    torch.testing.assert_close(out.loss, out_plain.loss + 0.5 * out.entropy_loss)
    assert torch.equal(out.codes, out_plain.codes)
    # it is a differentiable term: it reaches the codebooks beyond the chosen codes and the input
    out.entropy_loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert (ent.codebooks.grad.abs().sum(-1) > 0).sum() > len(out.codes.reshape(-1, 4).unique(dim=0))


def test_entropy_loss_value_from_its_definition():
    ent = make_quantizer(dim=8, k=2, K=5, entropy_weight=1.0, entropy_temperature=0.1)
    z = torch.randn(7, 8)
    out = ent(z)
    chunks = F.normalize(z.reshape(7, 2, 4), dim=-1)
    codes = F.normalize(ent.codebooks.detach(), dim=-1)
    total = 0.0
    for i in range(2):
        p = ((chunks[:, i] @ codes[i].T) / 0.1).softmax(-1)                    # (N, K)
        per_token = -(p * p.log()).sum(-1).mean()
        mean_p = p.mean(0)
        total = total + per_token + (mean_p * mean_p.log()).sum()
    torch.testing.assert_close(out.entropy_loss, total / 2, rtol=1e-5, atol=1e-6)


def test_dead_code_restart():
    k, K, d = 2, 16, 4
    q = make_quantizer(dim=k * d, k=k, K=K, seed=5, dead_code_restart_every=2).train()
    used = [0, 3]                      # the inputs are (noisy copies of) codes 0 and 3 of every sub-codebook
    gen = torch.Generator().manual_seed(0)

    def batch():
        pick = torch.tensor(used)[torch.randint(0, 2, (20,), generator=gen)]
        chunks = torch.stack([q.codebooks.detach()[i, pick] for i in range(k)], dim=1)  # (20, k, d)
        return (chunks + 1e-3 * torch.randn(chunks.shape, generator=gen)).reshape(20, k * d)

    before = q.codebooks.detach().clone()
    first = batch()
    out1 = q(first)
    assert set(out1.codes.unique().tolist()) == set(used)
    assert torch.equal(q.codebooks.detach(), before)              # one call: nothing restarted yet
    q.eval()
    q(torch.randn(50, k * d))                                     # evaluation calls neither count nor restart
    assert torch.equal(q.codebooks.detach(), before) and int(q.calls_since_restart) == 1
    q.train()
    second = batch()
    out2 = q(second)
    assert set(out2.codes.unique().tolist()) == set(used)
    after = q.codebooks.detach()
    unused = [j for j in range(K) if j not in used]
    assert torch.equal(after[:, used], before[:, used])          # used codes untouched
    assert (after[:, unused] != before[:, unused]).any(-1).all()  # every unused code was replaced
    # each replacement points along a (normalised) chunk of the restart batch, rescaled to the codebook's norms
    batch_dirs = F.normalize(second.reshape(20, k, d), dim=-1)
    for i in range(k):
        new_dirs = F.normalize(after[i, unused], dim=-1)
        assert (new_dirs @ batch_dirs[:, i].T).max(-1).values.min() > 1 - 1e-5
    assert int(q.calls_since_restart) == 0 and not q.usage_since_restart.any()


# ---------------------------------------------------------------------------------------------------------------
# Memory stays bounded


def test_search_memory_is_bounded(monkeypatch):
    """The (k, block, K) similarity is the only search temporary; it stays near `search_block_elements` floats
    whatever the number of tokens (a block has at least one token, so the floor is k * K)."""
    sizes = []
    real_bmm = torch.bmm

    def recording_bmm(a, b, *args, **kwargs):
        result = real_bmm(a, b, *args, **kwargs)
        sizes.append(result.numel())
        return result

    monkeypatch.setattr(torch, "bmm", recording_bmm)
    k, K = 4, 64
    for budget in (k * K, 3 * k * K, 10 * k * K):
        q = make_quantizer(dim=4 * k, k=k, K=K, search_block_elements=budget)
        for n in (1, 100, 1000):
            sizes.clear()
            out = q(torch.randn(n, 4 * k))
            block = budget // (k * K)
            assert len(sizes) == math.ceil(n / block)                 # several blocks ...
            assert max(sizes) <= budget                               # ... none larger than the budget
            assert out.codes.shape == (n, k)
    # and the result does not depend on the block size
    q_small = make_quantizer(dim=4 * k, k=k, K=K, search_block_elements=1)
    q_big = make_quantizer(dim=4 * k, k=k, K=K)
    z = torch.randn(300, 4 * k)
    assert torch.equal(q_small(z).codes, q_big(z).codes)
