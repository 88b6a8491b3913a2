"""Relative-position-bias ViTs (timm BEiT, VisionTransformerRelPos) beyond the family matrix.

tests/test_families.py checks the tiny beit_* / relpos_* families against the independent
references. Here: the patched fallback (training mode with an active dropout; post-norm
``ResPostRelPosBlock`` blocks the parts do not cover), biases large enough to dominate the
scores (BEiT's own and shared tables summed, a RelPosBias table with [class] entries), and the
refusal of input sizes the bias is not built for.
"""

import copy

import pytest
import torch

import reference_families as ref
from helpers import _beit, _relpos, _state, family_input, make_family, one_thread

TARGETS = [1, 4, 7]


def _close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(1), torch.as_tensor(b, dtype=torch.float64).flatten(1)
    scale = float(b.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def _nearly_deterministic_training_copy(model):
    """A training-mode copy whose every dropout is active at a rate of 1e-9.

    The adapter sees active randomness, so the patched fallback runs (the pure forward does not
    reproduce dropout), while the numbers stay the eval model's: no element is dropped at these
    sizes (the runs are seeded) and the 1 / (1 - p) rescaling is 1 to float precision.
    """
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 1e-9
    return m


def _scaled_bias(model, factor=30.0):
    """``model`` with every relative-position parameter scaled, so that the bias dominates the scores."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or "rel_pos" in name:
                p.mul_(factor)
    return model


#: relative-position configurations the family matrix does not hold
EXTRA = {
    # BEiT with its own tables and a shared one (summed) and an absolute position embedding
    "beit_own_and_shared": lambda: _beit(use_abs_pos_emb=True, use_rel_pos_bias=True, use_shared_rel_pos_bias=True,
                                         global_pool="token", init_values=0.1),
    # RelPosBias with a [class] token: the table holds the [class]-to-patch and patch-to-[class] entries
    "relpos_bias_cls": lambda: _relpos(class_token=True, global_pool="token", rel_pos_type="bias"),
    "relpos_bias_shared": lambda: _relpos(class_token=True, global_pool="token", rel_pos_type="bias",
                                          shared_rel_pos=True),
}


def _build(name):
    return EXTRA[name]() if name in EXTRA else make_family(name)


def _relpos_post_norm(head, **kw):
    """vit_relpos_*_rpn-like: post-norm blocks, a [class] head or (as those models) average pooling."""
    from timm.models.vision_transformer_relpos import ResPostRelPosBlock

    pool = dict(class_token=True, global_pool="token") if head == "token" else dict(class_token=False,
                                                                                   global_pool="avg")
    return _relpos(block_fn=ResPostRelPosBlock, **pool, **kw)


@pytest.mark.filterwarnings("ignore:.*training mode")
@pytest.mark.parametrize("name", ["beit_cls", "beit_avg", "relpos_cls", "relpos_avg", "relpos_shared",
                                  "beit_own_and_shared"])
def test_training_mode_with_active_dropout_runs_the_patched_fallback(name):
    from captum_vit import AGCAM, AttentionRollout, RawAttention
    from captum_vit.vit import adapt

    model = _build(name)
    trained = _nearly_deterministic_training_copy(model)
    adapter = adapt(trained)
    assert adapter.parts is not None and adapter.active_randomness(), "the fallback would not run"
    x = family_input("beit_cls", batch=3)
    q = {"query": "pooled" if name.endswith("_avg") else "class"}
    before = _state(trained)
    with one_thread():
        torch.manual_seed(0)
        agcam = AGCAM(trained, **q)
        assert agcam.resolved_engine() == "generic"
        _close(agcam.attribute(x, target=TARGETS), ref.agcam_batched(model, x, TARGETS, **q))
        _close(AttentionRollout(trained, **q).attribute(x), ref.rollout_batched(model, x, **q))
        _close(RawAttention(trained, **q).attribute(x), ref.raw_attention_batched(model, x, **q))
    assert _state(trained) == before


def test_relpos_mlp_bias_has_its_own_dropout_in_training_mode():
    # timm's RelPosMlp builds its MLP with a dropout of 0.125, whatever the model's rates: a
    # training-mode vit_relpos model is random, and only the fallback reproduces it.
    from captum_vit.vit import adapt

    model = make_family("relpos_cls")
    assert adapt(model).active_randomness() == []
    trained = copy.deepcopy(model).train()
    random = adapt(trained).active_randomness()
    assert random and all(".rel_pos.mlp." in name for name in random)


@pytest.mark.parametrize("rel_pos_type", ["bias", "mlp"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("head", ["token", "avg"])
def test_post_norm_blocks_run_the_patched_fallback(head, rel_pos_type, shared):
    from captum_vit import AGCAM, CDAM, AttentionRollout, GradientAttentionRollout, RawAttention
    from captum_vit.vit import adapt

    model = _relpos_post_norm(head, rel_pos_type=rel_pos_type, shared_rel_pos=shared)
    adapter = adapt(model)
    assert adapter.parts is None and "ResPostRelPosBlock" in adapter.parts_missing
    x = family_input("relpos_cls", batch=3)
    q = {"query": "class" if head == "token" else "pooled"}
    before = _state(model)
    with one_thread():
        agcam = AGCAM(model, **q)
        assert agcam.resolved_engine() == "generic"
        _close(agcam.attribute(x, target=TARGETS), ref.agcam_batched(model, x, TARGETS, **q))
        _close(GradientAttentionRollout(model, **q).attribute(x, target=TARGETS),
               ref.gae_batched(model, x, TARGETS, **q))
        _close(AttentionRollout(model, **q).attribute(x), ref.rollout_batched(model, x, **q))
        _close(RawAttention(model, **q).attribute(x), ref.raw_attention_batched(model, x, **q))
        with torch.no_grad():
            _close(adapter.logits(x), ref.logits_batched(model, x))
    with pytest.raises(ValueError, match="ResPostRelPosBlock"):
        CDAM(model)  # it re-runs the last block from its input, which needs the parts
    assert _state(model) == before


@pytest.mark.parametrize("name", sorted(EXTRA))
def test_a_dominant_bias_is_applied_as_the_model_applies_it(name):
    from captum_vit import AGCAM, AttentionRollout, GradientAttentionRollout

    model = _scaled_bias(_build(name))
    x = family_input("beit_cls", batch=3)
    with one_thread():
        want = ref.agcam_batched(model, x, TARGETS)
        one = AGCAM(model, engine="one_token")
        with torch.inference_mode():
            _close(one.attribute(x, target=TARGETS), want)
        _close(AGCAM(model, engine="generic").attribute(x, target=TARGETS), want)
        _close(GradientAttentionRollout(model).attribute(x, target=TARGETS), ref.gae_batched(model, x, TARGETS))
        _close(AttentionRollout(model).attribute(x), ref.rollout_batched(model, x))
        # the bias matters at this scale: the map without it is another one
        other = ref.agcam_batched(_scaled_bias(copy.deepcopy(model), 0.0), x, TARGETS)
    assert float((other - want).abs().max()) > 1e-2 * float(want.abs().max())


@pytest.mark.parametrize("family", ["beit_cls", "beit_avg", "relpos_cls", "relpos_avg", "relpos_shared"])
def test_other_input_sizes_are_refused_before_any_compute(family):
    from captum_vit import CDAM

    model = make_family(family)
    calls = []
    handle = model.patch_embed.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"(?s)48x48 makes a 6x6 patch grid.*relative-position bias.*8x8 grid"):
            CDAM(model).attribute(torch.randn(1, 3, 48, 48), target=1)
        with pytest.raises(ValueError, match="not divisible by the patch size"):
            CDAM(model).attribute(torch.randn(1, 3, 60, 64), target=1)
    finally:
        handle.remove()
    assert not calls


@pytest.mark.parametrize("family", ["beit_cls", "relpos_cls", "relpos_avg", "relpos_shared"])
def test_set_input_size_rebuilds_the_bias_for_another_size(family):
    # The refusal names model.set_input_size where timm has it; after it, the model is explained at the new size.
    from captum_vit import AGCAM

    model = make_family(family)
    query = "pooled" if family.endswith("_avg") else "class"
    if not hasattr(model, "set_input_size"):
        with pytest.raises(ValueError, match="no set_input_size"):
            AGCAM(model, query=query).attribute(torch.randn(1, 3, 48, 48), target=1)
        return
    with pytest.raises(ValueError, match=r"set_input_size\(img_size=\(48, 48\)\)"):
        AGCAM(model, query=query).attribute(torch.randn(1, 3, 48, 48), target=1)
    model.set_input_size(img_size=(48, 48))
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with one_thread():
        want = ref.agcam_batched(model, x, [1, 4], query=query)
        _close(AGCAM(model, query=query).attribute(x, target=[1, 4]), want)


@pytest.mark.parametrize("builder", ["beit", "relpos"])
def test_a_head_that_does_not_pool_is_refused(builder):
    from captum_vit.vit import UnsupportedModelError, adapt

    model = _beit(global_pool="") if builder == "beit" else _relpos(global_pool="")
    with pytest.raises(UnsupportedModelError, match="global_pool=''"):
        adapt(model)
