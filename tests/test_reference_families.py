"""The family references of reference_families.py: validated against the package and the older
references on the models the package supports today, and checked to sit on every family's own path."""

from functools import cache

import pytest
import torch
import torch.nn.functional as F

import reference as ref_agcam
import reference_families as R
import reference_methods as ref_methods
from helpers import FAMILIES, _close, _state, family_input, input_for, make_family, make_hf, make_timm, one_thread

TARGETS = [1, 7, 4]
SUPPORTED = ["plain", "registers", "distilled", "hf"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny single-image work: one intra-op thread is many times faster than two fighting over shared cores."""
    with one_thread():
        yield


@cache
def _supported(arch):
    return make_hf() if arch == "hf" else make_timm(arch)


@cache
def _family(name):
    return make_family(name)


def _api(name):
    import captum_vit

    return getattr(captum_vit, name)


def _flat(cam, batch=3):
    return cam.detach().reshape(batch, -1)


def _nontrivial(r):
    assert torch.isfinite(r).all()
    assert r.abs().max() > 0, "reference map is all zero: the comparison would be vacuous"


# ----------------------------------------------------------------------------- (a) against the package


@pytest.mark.parametrize("arch", SUPPORTED)
def test_references_equal_package_and_older_references(arch):
    model = _supported(arch)
    x = input_for(arch)
    cases = {
        "agcam": (R.agcam_batched(model, x, TARGETS), _api("AGCAM")(model).attribute(x, target=TARGETS),
                  ref_agcam.agcam_reference(model, x, TARGETS)),
        "agcam_last": (R.agcam_batched(model, x, TARGETS, layers=[-1]),
                       _api("AGCAM")(model, layers=[-1]).attribute(x, target=TARGETS),
                       ref_agcam.agcam_reference(model, x, TARGETS, layers=[-1])),
        "rollout": (R.rollout_batched(model, x), _api("AttentionRollout")(model).attribute(x),
                    ref_methods.rollout(model, x)),
        "rollout_max": (R.rollout_batched(model, x, head_fusion="max"),
                        _api("AttentionRollout")(model, head_fusion="max").attribute(x),
                        ref_methods.rollout(model, x, head_fusion="max")),
        "raw": (R.raw_attention_batched(model, x), _api("RawAttention")(model).attribute(x),
                ref_methods.raw_attention(model, x)),
        "gae": (R.gae_batched(model, x, TARGETS), _api("GradientAttentionRollout")(model).attribute(x, target=TARGETS),
                ref_methods.gae(model, x, TARGETS)),
        "cdam": (R.cdam_batched(model, x, TARGETS), _api("CDAM")(model).attribute(x, target=TARGETS),
                 ref_methods.cdam(model, x, TARGETS)),
    }
    for name, (ours, package, older) in cases.items():
        _nontrivial(ours)
        assert ours.shape == (3, 64), (name, ours.shape)
        _close(_flat(package), ours)
        _close(older, ours)
    out = model(x)
    _close(R.logits_batched(model, x), getattr(out, "logits", out).detach())


def test_pooled_equals_class_on_class_token_heads():
    model = _supported("plain")
    x = input_for("plain", batch=1)
    _close(R.agcam(model, x, 3, query="pooled"), R.agcam(model, x, 3, query="class"))
    w = R.query_weights(_supported("distilled"), x, "pooled")
    assert w[0] == w[1] == 0.5 and w[2:].abs().max() == 0


# ----------------------------------------------------------------------------- (b) every family builds


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_builds_and_runs(name):
    model = _family(name)
    assert not model.training
    x = family_input(name, batch=2)
    with torch.no_grad():
        out = model(x)
    out = getattr(out, "logits", out)
    assert out.shape == (2, 10) and torch.isfinite(out).all()
    # the blocks' attention all reach the patch, and only they are tagged as blocks
    with torch.no_grad():
        _, rec = R._forward(model, x[:1])
    n_extra = 1 if getattr(model, "attn_pool", None) is not None else 0
    assert len(rec.calls) == len(R.block_attentions(model)) + n_extra == 3 + n_extra
    N = rec.calls[0].A.shape[-1]
    assert N == 64 + R.num_prefix_tokens(model)
    for c in rec.calls:
        _close(c.A.sum(-1), torch.ones_like(c.A.sum(-1)))


# ----------------------------------------------------------------------------- (c) leaves everything as found


def _hf_impl(model):
    return model.config._attn_implementation if R.is_hf(model) else None


@pytest.mark.parametrize("name", ["eva_cls", "vit_map", "beit_cls", "hf_deit"])
def test_patch_and_flags_restored(name):
    model = make_family(name)  # private: its flags are changed
    x = family_input(name, batch=1)
    sdpa = F.scaled_dot_product_attention
    attn = R.block_attentions(model)[1]
    if R.is_hf(model):
        model.config._attn_implementation = "eager"  # the patch only sees sdpa: the reference switches
    else:
        attn.fused_attn = False  # an unfused module: the reference forces it onto sdpa
    before, impl = _state(model), _hf_impl(model)
    for run in (lambda: R.agcam(model, x, 2, query="pooled"), lambda: R.gae(model, x, 2, query="pooled"),
                lambda: R.rollout(model, x, query="pooled"), lambda: R.cdam(model, x, 2)):
        run()
        assert F.scaled_dot_product_attention is sdpa
        assert _state(model) == before and _hf_impl(model) == impl
    # still every block's call recorded, the modified one included
    with torch.no_grad():
        _, rec = R._forward(model, x)
    assert [c.block for c in rec.block_calls()] == [0, 1, 2]
    assert _state(model) == before and _hf_impl(model) == impl

    def boom(_m, _args):
        raise RuntimeError("boom")

    mlp = (model.blocks[1] if hasattr(model, "blocks") else model.deit.layers[1]).mlp
    handle = mlp.register_forward_pre_hook(boom)
    try:
        for run in (lambda: R.agcam(model, x, 2), lambda: R.cdam(model, x, 2), lambda: R.rollout(model, x)):
            with pytest.raises(RuntimeError, match="boom"):
                run()
            assert F.scaled_dot_product_attention is sdpa
            assert _hf_impl(model) == impl
    finally:
        handle.remove()
    assert _state(model) == before


# ----------------------------------------------------------------------------- (d) pooled query weights


def test_query_weights_gap_uniform_over_patches():
    model = _family("vit_gap")
    x = family_input("vit_gap", batch=1)
    w = R.query_weights(model, x, "pooled")
    assert w.shape == (64,)
    _close(w, torch.full((64,), 1 / 64))
    _close(w.sum(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="class"):
        R.query_weights(model, x, "class")
    w = R.query_weights(_family("eva02_avg"), x, "pooled")  # avg pooling skips the [class] token
    assert w[0] == 0
    _close(w[1:], torch.full((64,), 1 / 64))


def _pool_attention_by_hand(model, x):
    """The MAP head's attention from its own latent, q and kv layers, on its recorded input."""
    pool = model.attn_pool
    seen = {}
    h = pool.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    t = seen["x"]
    B, N, C = t.shape
    H, d = pool.num_heads, pool.head_dim
    q = pool.q_norm(pool.q(pool.latent).reshape(1, 1, H, d).transpose(1, 2))
    k = pool.k_norm(pool.kv(t).reshape(B, N, 2, H, d).permute(2, 0, 3, 1, 4)[0])
    a = torch.softmax((q @ k.transpose(-2, -1)) * d ** -0.5, dim=-1)  # [1, H, 1, N]
    return a[0, :, 0].mean(0).detach()


@pytest.mark.parametrize("name", ["vit_map", "pe_core_map", "naflex"])
def test_query_weights_map_is_the_pool_attention(name):
    model = _family(name)
    x = family_input(name, batch=1)
    w = R.query_weights(model, x, "pooled")
    p = R.num_prefix_tokens(model)
    a = _pool_attention_by_hand(model, x)
    assert w.shape == (64 + p,)
    _close(w.sum(), torch.tensor(1.0))
    _close(w[w.shape[0] - a.shape[0]:], a)
    if name == "naflex":  # its MAP head sees the patch tokens only
        assert a.shape[0] == 64 and w[:p].abs().max() == 0
    else:  # timm Eva's MAP (PE-core) sees every token, [class] included
        assert a.shape[0] == w.shape[0]


def test_query_weights_dinov2_half_on_class():
    model = _family("hf_dinov2")
    x = family_input("hf_dinov2", batch=1)
    w = R.query_weights(model, x, "pooled")
    assert w.shape == (65,)
    _close(w[:1], torch.tensor([0.5]))
    _close(w[1:], torch.full((64,), 0.5 / 64))
    _close(R.query_weights(_family("hf_deit_teacher"), x, "pooled")[:2], torch.tensor([0.5, 0.5]))


# ----------------------------------------------------------------------------- (e) the patch sits on the path


@pytest.mark.parametrize("name", ["eva_cls", "pe_core_map", "beit_cls", "relpos_shared", "naflex", "hf_dinov2"])
def test_recorded_attention_reproduces_the_logits(name):
    model = _family(name)
    x = family_input(name, batch=1)
    with torch.no_grad():
        plain = R.logits(model, x)
        patched, rec = R._forward(model, x)  # the model's output from A @ v of the recorded attention
        _close(patched, plain)
        # and it is the model's path: other attention, other logits
        uniform = lambda A, block: torch.full_like(A, 1.0 / A.shape[-1])  # noqa: E731
        with R.recording(model, edit=uniform):
            edited = R._model_logits(model(x))
    assert (edited - plain).abs().max() > 1e-3 * plain.abs().max()
    if name == "beit_cls":  # relative position bias reaches sdpa as the additive mask: S is not q k^T alone
        S = rec.block_calls()[0].S
        assert (S[0, 0] - S[0, 1]).abs().max() > 0
