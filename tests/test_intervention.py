"""The edit maths on small tensors, against by-hand computations with the SAE's weights."""

from __future__ import annotations

import pytest
import torch

from sae_modules.intervention import (
    SPARSE_DECODE_DENSITY,
    can_use_fast_path,
    decode_latents,
    edit_activations,
    reconstruction_stats,
    token_mask,
)
from sae_modules.intervention_spec import Intervention
from sae_modules.saes import SAEConfig, build_sae

D, F, T = 16, 64, 9


def make_sae(architecture: str = "batchtopk", seed: int = 0):
    torch.manual_seed(seed)
    cfg = SAEConfig(architecture=architecture, d_in=D, n_latents=F, k=6, threshold=0.2)
    sae = build_sae(cfg).eval()
    with torch.no_grad():
        sae.b_enc.uniform_(-0.3, 0.3)
        sae.b_dec.normal_(0, 0.1)
    return sae


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(T, D, generator=torch.Generator().manual_seed(1))


def test_token_mask_scopes():
    assert token_mask("all", 5).tolist() == [True] * 5
    assert token_mask("cls", 5).tolist() == [True, False, False, False, False]
    assert token_mask("patches", 5).tolist() == [False, True, True, True, True]
    assert token_mask([1, 3], 5).tolist() == [False, True, False, True, False]


@pytest.mark.parametrize("mode,expect", [("pin", lambda f: torch.full_like(f, 2.5)), ("nudge", lambda f: f + 2.5),
                                         ("mul", lambda f: f * 2.5)])
@pytest.mark.parametrize("scope", ["all", "cls", "patches", [2, 5]])
def test_modes_and_scopes_paper_mode(x, mode, expect, scope):
    """Paper mode output = decode(f') where f' is f with exactly the named tokens of the latent changed."""
    sae = make_sae()
    f = sae.encode(x)
    latent = int(f.ne(0).sum(0).argmax())
    edit = edit_activations(sae, x, [Intervention(latent=latent, mode=mode, value=2.5, tokens=scope)],
                            use_error_term=False)
    mask = token_mask(scope, T)
    edited = f.clone()
    edited[mask, latent] = expect(f[mask, latent])
    torch.testing.assert_close(edit.output, edited @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=1e-5)
    assert edit.latents == [latent]
    assert edit.before == pytest.approx([f[mask, latent].mean().item()], abs=1e-6)
    assert edit.after == pytest.approx([expect(f[mask, latent]).mean().item()], abs=1e-6)


@pytest.mark.parametrize("scope", ["all", "cls", "patches", [0, 4]])
def test_error_mode_is_x_plus_latent_delta(x, scope):
    sae = make_sae()
    f = sae.encode(x)
    edits = [Intervention(latent=3, mode="pin", value=4.0, tokens=scope),
             Intervention(latent=7, mode="nudge", value=-1.5, tokens="all")]
    edit = edit_activations(sae, x, edits, use_error_term=True)
    edited = f.clone()
    edited[token_mask(scope, T), 3] = 4.0
    edited[:, 7] -= 1.5
    expected = x + (edited - f) @ sae.W_dec
    torch.testing.assert_close(edit.output, expected, atol=1e-5, rtol=1e-5)
    untouched = ~token_mask(scope, T)
    if untouched.any():
        torch.testing.assert_close(edit.output[untouched], (x + (edited - f) @ sae.W_dec)[untouched])


def test_error_mode_edit_is_never_cancelled(x):
    """The error comes from the unedited reconstruction: re-encoding the output shows the pinned value,
    while an error computed from the edited reconstruction would give back x exactly."""
    sae = make_sae()
    edit = edit_activations(sae, x, [Intervention(latent=5, value=6.0)], use_error_term=True)
    assert not torch.allclose(edit.output, x, atol=1e-3)
    shift = (edit.output - x) @ sae.W_dec[5]
    f5 = sae.encode(x)[:, 5]
    torch.testing.assert_close(shift, (6.0 - f5) * sae.W_dec[5].dot(sae.W_dec[5]))


def test_nothing_edited_error_mode_is_identity(x):
    sae = make_sae()
    assert torch.equal(edit_activations(sae, x, [], use_error_term=True).output, x)
    assert torch.equal(edit_activations(sae, x, [], use_error_term=True, fast=False).output, x)


def test_pin_to_current_value_changes_nothing_in_error_mode(x):
    sae = make_sae()
    f = sae.encode(x)
    token = int(f[:, 11].argmax())
    value = f[token, 11].item()
    edit = edit_activations(sae, x, [Intervention(latent=11, value=value, tokens=[token])], use_error_term=True)
    torch.testing.assert_close(edit.output, x, atol=1e-6, rtol=0)


def test_pre_zero(x):
    sae = make_sae()
    f = sae.encode(x)
    edits = [Intervention(latent=2, value=3.0, tokens="patches")]
    edited = torch.zeros_like(f)
    edited[1:, 2] = 3.0
    paper = edit_activations(sae, x, edits, use_error_term=False, pre_zero=True)
    torch.testing.assert_close(paper.output, edited @ sae.W_dec + sae.b_dec, atol=1e-5, rtol=1e-5)
    kept = edit_activations(sae, x, edits, use_error_term=True, pre_zero=True)
    torch.testing.assert_close(kept.output, x + (edited - f) @ sae.W_dec, atol=1e-5, rtol=1e-5)
    assert kept.before == pytest.approx([f[1:, 2].mean().item()], abs=1e-6)


@pytest.mark.parametrize("architecture", ["batchtopk", "relu", "matryoshka_batchtopk"])
def test_fast_path_equals_full_path(x, architecture):
    sae = make_sae(architecture) if architecture != "matryoshka_batchtopk" else build_sae(SAEConfig(
        architecture=architecture, d_in=D, n_latents=F, k=6, threshold=0.2, group_sizes=[16, 48])).eval()
    assert can_use_fast_path(sae, use_error_term=True, pre_zero=False)
    edits = [Intervention(latent=1, value=2.0), Intervention(latent=9, mode="mul", value=3.0, tokens="patches"),
             Intervention(latent=1, mode="nudge", value=0.5, tokens=[0])]
    fast = edit_activations(sae, x, edits, use_error_term=True)
    full = edit_activations(sae, x, edits, use_error_term=True, fast=False)
    torch.testing.assert_close(fast.output, full.output, atol=1e-5, rtol=1e-5)
    assert fast.before == pytest.approx(full.before) and fast.after == pytest.approx(full.after)


def test_topk_is_not_fast_path_eligible(x):
    sae = make_sae("topk")
    assert not can_use_fast_path(sae, use_error_term=True, pre_zero=False)
    edit = edit_activations(sae, x, [Intervention(latent=0, value=1.0)], use_error_term=True)
    f = sae.encode(x)
    edited = f.clone()
    edited[:, 0] = 1.0
    torch.testing.assert_close(edit.output, x + (edited - f) @ sae.W_dec, atol=1e-5, rtol=1e-5)


def test_reconstruction_stats_by_hand(x):
    sae = make_sae()
    f = sae.encode(x)
    stats = reconstruction_stats(sae, x, f)
    recon = f @ sae.W_dec + sae.b_dec
    assert stats.l0 == pytest.approx((f != 0).float().sum(1).mean().item())
    assert stats.fvu == pytest.approx((((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()).item(), rel=1e-5)


def test_sparse_decode_equals_dense_decode():
    sae = make_sae()
    sparse = torch.zeros(T, F)
    sparse[torch.arange(T), torch.arange(T) * 5] = torch.rand(T) + 0.5
    assert sparse.count_nonzero() < SPARSE_DECODE_DENSITY * sparse.numel()
    torch.testing.assert_close(decode_latents(sae, sparse), sae.decode(sparse))
    dense = torch.rand(T, F)
    torch.testing.assert_close(decode_latents(sae, dense), sae.decode(dense))
