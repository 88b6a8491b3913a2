"""timm ``Eva`` beyond the family matrix (tests/test_families.py): more options of the pure forward
(q/k norm, head-output norm, registers, the half rotary layout, ...), the configurations the parts do
not describe (post-norm blocks, gated and grouped-query attention) through the patched fallback,
training mode (dropout, the rope's coordinate augmentation), ``dynamic_img_size`` (and its ONNX
export), the per-block 'mixed' rope, and the model left as found when a method fails inside it.

Every comparison is against the independent references of tests/reference_families.py (the model's
own forward) or the model's own logits. Options the installed timm lacks skip (the suite also runs on
timm 1.0.16).
"""

import numpy as np
import pytest
import torch

import reference_families as ref
from helpers import _close, _eva, _state, family_input, make_family, one_thread

TARGETS = [1, 4, 7]
CLS = dict(class_token=True, global_pool="token", use_rot_pos_emb=True, init_values=0.1)


def _gated():
    """An Eva whose blocks gate the attention output (``EvaBlock(gated_attn=True)``; Eva has no option for it)."""
    from timm.models.eva import EvaBlock

    if "gated_attn" not in EvaBlock.__init__.__code__.co_varnames:
        pytest.skip("this timm's EvaBlock has no gated attention")
    m = _eva(**CLS)
    torch.manual_seed(3)
    for i, old in enumerate(m.blocks):
        blk = EvaBlock(48, 4, gated_attn=True, init_values=0.1, num_prefix_tokens=1)
        blk.load_state_dict(old.state_dict(), strict=False)  # the gate keeps its random init
        m.blocks[i] = blk.eval()
    return m


#: configurations the parts do not describe, and the reason the adapter gives
FALLBACK = {
    "postnorm": (lambda: _eva(**CLS, use_post_norm=True), "post-norm"),
    "gated": (_gated, "gates its output"),
    "gqa": (lambda: _eva(**CLS, attn_type="rope", qkv_fused=False, num_kv_heads=2), "grouped-query"),
}


#: options of the pure forward beyond the families: (options, whether AGCAM's one-token engine applies)
OPTIONS = {
    "scale_attn_inner": (dict(scale_attn_inner=True), False),  # head outputs normalised before the projection
    "qk_norm": (dict(qk_norm=True), True),
    "registers": (dict(num_reg_tokens=2), True),  # three prefix tokens, none rotated
    "rotate_half": (dict(rope_rotate_half=True), True),
    "no_qkv_bias": (dict(qkv_bias=False, swiglu_mlp=True), True),
    "attn_only_layer_scale": (dict(attn_only_layer_scale=True), True),
    "rope_attention": (dict(attn_type="rope", qkv_fused=False, qk_norm=True), True),
}


@pytest.mark.parametrize("variant", sorted(OPTIONS))
def test_options_of_the_pure_forward_equal_the_reference(variant):
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    options, one_token = OPTIONS[variant]
    model = _eva(**{**CLS, **options})
    x = family_input("eva_cls", batch=3)
    try:
        with torch.no_grad():
            model(x[:1])
    except RuntimeError as e:  # e.g. timm 1.0.16's Eva adds a position table sized without the registers
        import timm

        pytest.skip(f"timm {timm.__version__}'s own Eva forward fails on {variant}: {e}")
    a = adapt(model)
    assert a.parts is not None and a.one_token_support()[0] == one_token
    with one_thread():
        with torch.no_grad():
            _close(a.logits(x), model(x))
        agcam = AGCAM(model)
        assert agcam.resolved_engine() == ("one_token" if one_token else "generic")
        _close(agcam.attribute(x, target=TARGETS).flatten(1), ref.agcam_batched(model, x, TARGETS))
        _close(METHODS["cdam"](model).attribute(x, target=TARGETS).flatten(1), ref.cdam_batched(model, x, TARGETS))


@pytest.mark.parametrize("variant", sorted(FALLBACK))
def test_configs_without_parts_run_the_patched_fallback_exactly(variant):
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    build, why = FALLBACK[variant]
    model = build()
    a = adapt(model)
    assert a.parts is None and why in a.parts_missing
    assert not a.one_token_support()[0]
    x = family_input("eva_cls", batch=3)
    before = _state(model)
    with one_thread():
        with torch.no_grad():
            _close(a.logits(x), model(x))
        assert AGCAM(model).resolved_engine() == "generic"
        _close(AGCAM(model).attribute(x, target=TARGETS).flatten(1), ref.agcam_batched(model, x, TARGETS))
        _close(METHODS["rollout"](model).attribute(x).flatten(1), ref.rollout_batched(model, x))
    with pytest.raises(ValueError, match=why):  # CDAM re-runs the last block from the parts
        METHODS["cdam"](model)
    assert _state(model) == before


def _seeded(fn, seed=7):
    torch.manual_seed(seed)
    return fn()


def test_training_mode_dropout_runs_the_fallback_with_the_models_own_draws():
    """Dropout and drop-path active: the patched fallback runs the model's own forward, draw for draw."""
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    model = _eva(**CLS, swiglu_mlp=True, attn_drop_rate=0.2, proj_drop_rate=0.1, drop_path_rate=0.2).train()
    for blk in model.blocks:  # the unfused attention draws its dropout mask as the fallback does (nn.Dropout)
        blk.attn.fused_attn = False
    a = adapt(model)
    assert a.parts is not None and a.active_randomness()
    x = family_input("eva_cls", batch=2)
    before = _state(model)
    with one_thread():
        with torch.no_grad():
            own = _seeded(lambda: model(x))
            assert (_seeded(lambda: model(x), seed=8) - own).abs().max() > 0  # the draw matters
        with pytest.warns(UserWarning, match="training mode"):
            _, logits = _seeded(lambda: AGCAM(model).attribute(x, target=[1, 2], return_logits=True))
        _close(logits, own)
    with pytest.raises(ValueError, match="pure forward"):  # CDAM re-runs the last block: no dropout there
        METHODS["cdam"](model).attribute(x, target=[1, 2])
    assert _state(model) == before


def test_rope_coordinate_augmentation_in_training_mode_is_random_and_runs_the_fallback():
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    model = _eva(**CLS, rope_shift_coords=0.5).train()  # every dropout rate 0: only the rope is random
    a = adapt(model)
    assert a.active_randomness() == ["rope (random coordinate augmentation)"]
    x = family_input("eva_cls", batch=2)
    with one_thread():
        with torch.no_grad():
            own = _seeded(lambda: model(x))
            assert (_seeded(lambda: model(x), seed=8) - own).abs().max() > 0  # the draw matters
        with pytest.warns(UserWarning, match="training mode"):
            _, logits = _seeded(lambda: AGCAM(model).attribute(x, target=[1, 2], return_logits=True))
        _close(logits, own)
    with pytest.raises(ValueError, match="rope"):
        METHODS["cdam"](model).attribute(x, target=[1, 2])
    model.eval()
    assert not adapt(model).active_randomness()


def _dynamic():
    return _eva(**CLS, swiglu_mlp=True, scale_mlp=True, dynamic_img_size=True)


def test_dynamic_img_size_non_square_equals_the_reference_and_the_one_token_engine():
    from captum_vit import AGCAM
    from captum_vit.vit import adapt

    model = _dynamic()
    x = torch.randn(3, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    a = adapt(model)
    assert a.grid_size(x) == (6, 10)
    with one_thread():
        with torch.no_grad():
            _close(a.logits(x), model(x))
        generic = AGCAM(model, engine="generic").attribute(x, target=TARGETS)
        assert generic.shape == (3, 1, 6, 10)
        _close(generic.flatten(1), ref.agcam_batched(model, x, TARGETS))
        with torch.inference_mode():
            one = AGCAM(model, engine="one_token").attribute(x, target=TARGETS)
        _close(one, generic)


def test_dynamic_img_size_exports_one_input_size(tmp_path):
    """The export fixes a copy to the traced size; the model itself stays dynamic."""
    import onnxruntime as ort

    from captum_vit import AGCAM
    from captum_vit.onnx import export_onnx

    model = _dynamic()
    if not hasattr(model, "set_input_size"):
        with pytest.raises(ValueError, match="upgrade timm"):
            export_onnx(model, str(tmp_path / "m.onnx"), data_config={"input_size": (3, 48, 80)})
        return
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
    cfg = {"input_size": (3, 48, 80), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "squash"}
    before = _state(model)
    with one_thread():
        path = export_onnx(model, str(tmp_path / "m.onnx"), data_config=cfg)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits, cam = session.run(None, {"image": x.numpy(), "target": np.asarray([1, 4], dtype=np.int64)})
        eager, eager_logits = AGCAM(model).attribute(x, target=[1, 4], return_logits=True)
    _close(torch.from_numpy(logits), eager_logits, rel=1e-4)
    _close(torch.from_numpy(cam).flatten(1), eager.flatten(1), rel=1e-4)
    assert _state(model) == before and model.dynamic_img_size


def test_mixed_rope_reads_one_table_per_block():
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    model = _eva(**CLS, rope_type="mixed", use_abs_pos_emb=False)
    a = adapt(model)
    assert a.rope_per_block and a.parts is not None
    x = family_input("eva_cls", batch=3)
    with one_thread():
        with torch.no_grad():
            _close(a.logits(x), model(x))
        generic = AGCAM(model, engine="generic").attribute(x, target=TARGETS)
        _close(generic.flatten(1), ref.agcam_batched(model, x, TARGETS))
        with torch.inference_mode():
            _close(AGCAM(model, engine="one_token").attribute(x, target=TARGETS), generic)
        _close(METHODS["cdam"](model).attribute(x, target=TARGETS).flatten(1), ref.cdam_batched(model, x, TARGETS))


@pytest.mark.parametrize("build", [lambda: make_family("eva_cls"), FALLBACK["postnorm"][0]],
                         ids=["pure", "fallback"])
def test_model_left_as_found_after_an_exception_inside_it(build):
    """A user's hook raising inside block 1's MLP (``fc2``: every MLP kind has one) during each method."""
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS

    model = build()
    x = family_input("eva_cls", batch=2)
    makers = [lambda m: AGCAM(m, engine="generic"), lambda m: METHODS["rollout"](m)]
    if "Post" not in type(model.blocks[0]).__name__:
        makers += [lambda m: AGCAM(m, engine="one_token"), lambda m: METHODS["cdam"](m)]
    before = _state(model)

    def boom(_m, _args):
        raise RuntimeError("boom")

    handle = model.blocks[1].mlp.fc2.register_forward_pre_hook(boom)
    try:
        with one_thread():
            for make in makers:
                with pytest.raises(RuntimeError, match="boom"):
                    make(model).attribute(x, target=[1, 2])
    finally:
        handle.remove()
    assert _state(model) == before
    with one_thread():  # and the next call is the model's own again
        _close(AGCAM(model).attribute(x, target=[1, 2]).flatten(1), ref.agcam_batched(model, x, [1, 2]))
