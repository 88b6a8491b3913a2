"""timm NaFlexVit beyond the family matrix (tests/test_families.py: families "naflex" and "naflex_cls").

What the matrix does not cover: the NaFlex patch dictionaries and pre-patchified tensors refused
before any compute; images whose patch grid is not square and not the position table's (the model
resamples its table per call), against the independent references and through the ONNX export;
the export's fixed-size copy; the patched fallback (blocks the parts do not cover, and training mode
with an active dropout); LRP against the same weights in a timm VisionTransformer; configurations
refused at construction; and the model left as found when an exception escapes.
"""

import functools
import warnings

import numpy as np
import pytest
import torch

import reference_families as ref
from helpers import _close, _naflex, _state, family_input, make_family, one_thread, raise_inside_block_1_mlp

TARGETS = [1, 4, 7]


def _rel(a, b, rel=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64).flatten(1), torch.as_tensor(b, dtype=torch.float64).flatten(1)
    assert float(b.abs().max()) > 0, "the reference map is all zero: the comparison would prove nothing"
    _close(a, b, rel=rel)


def _wide(batch=3, seed=2):
    """Images of 48 x 80: a 6 x 10 patch grid, neither square nor the 8 x 8 position table's."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 48, 80, generator=g)


def _calls_embedding(model):
    calls = []
    handle = model.embeds.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    return calls, handle


# ----------------------------------------------------------------------------- inputs refused


@pytest.mark.parametrize("family", ["naflex", "naflex_cls"])
def test_naflex_patch_dict_refused_before_any_compute(family):
    from captum_vit.attr import METHODS

    model = make_family(family)
    before = _state(model)
    x = family_input(family, batch=2)
    patches = x.reshape(2, 3, 8, 8, 8, 8).permute(0, 2, 4, 3, 5, 1).reshape(2, 64, 192)
    batch = {"patches": patches, "patch_coord": torch.zeros(2, 64, 2, dtype=torch.long),
             "patch_valid": torch.ones(2, 64, dtype=torch.bool)}
    calls, handle = _calls_embedding(model)
    try:
        query = "class" if family == "naflex_cls" else "pooled"
        method = METHODS["agcam"](model, query=query)
        with pytest.raises(TypeError, match=r"(?s)patch_coord.*not supported.*\[B, C, H, W\]"):
            method.attribute(batch, target=1)
        with pytest.raises(ValueError, match=r"pre-patchified patches \[B, N, P\*P\*C\]"):
            method.attribute(patches, target=1)
        with pytest.raises(ValueError, match=r"pre-patchified"):
            method.attribute(patches.reshape(2, 64, 8, 8, 3), target=1)
    finally:
        handle.remove()
    assert not calls
    assert _state(model) == before


def test_size_not_a_multiple_of_the_patch_refused():
    from captum_vit import AGCAM

    model = make_family("naflex_cls")
    with pytest.raises(ValueError, match=r"not divisible by the patch size 8x8.*dynamic_img_pad=True"):
        AGCAM(model).attribute(torch.randn(1, 3, 60, 64), target=1)


# ----------------------------------------------------------------------------- non-square images


@pytest.mark.parametrize("family,name", [("naflex", "agcam"), ("naflex", "rollout"), ("naflex_cls", "agcam"),
                                         ("naflex_cls", "gae"), ("naflex_cls", "cdam")])
def test_non_square_images_equal_the_independent_reference(family, name):
    from captum_vit.attr import METHODS
    from captum_vit.vit import adapt

    model = make_family(family)
    query = "class" if family == "naflex_cls" else "pooled"
    x = _wide()
    refs = {"agcam": ref.agcam_batched, "rollout": ref.rollout_batched, "gae": ref.gae_batched,
            "cdam": ref.cdam_batched}
    with one_thread():
        assert adapt(model).grid_size(x) == (6, 10)
        with torch.no_grad():
            _rel(adapt(model).logits(x), ref.logits_batched(model, x))
        kw = {"query": query} if name != "cdam" else {}
        cam = METHODS[name](model, **kw).attribute(x, target=TARGETS)
        assert cam.shape == (3, 1, 6, 10)
        _rel(cam, refs[name](model, x, TARGETS, **kw))


def test_one_token_engine_on_non_square_images():
    from captum_vit import AGCAM

    model = make_family("naflex_cls")
    x = _wide()
    with one_thread():
        with torch.inference_mode():
            a = AGCAM(model, engine="one_token").attribute(x, target=TARGETS)
        b = AGCAM(model, engine="generic").attribute(x, target=TARGETS)
    _rel(a, b)


# ----------------------------------------------------------------------------- fixed-size copy and ONNX


@pytest.mark.parametrize("pos_embed,ar_preserving", [("learned", False), ("learned", True), ("factorized", False),
                                                     ("factorized", True)])
def test_fixed_size_copy_computes_what_the_model_computes(pos_embed, ar_preserving):
    from captum_vit.vit import adapt

    model = _naflex(global_pool="token", class_token=True, pos_embed=pos_embed,
                    pos_embed_ar_preserving=ar_preserving)
    adapter = adapt(model)
    before = _state(model)
    table = {n: p.clone() for n, p in model.embeds.named_parameters()}
    assert adapter.for_input_size(64, 64) is model  # the table's own grid: nothing resampled
    fixed = adapter.for_input_size(48, 80)
    assert fixed is not model
    assert tuple(fixed.embeds.pos_embed.shape) == (1, 6, 10, 48)
    x = _wide(batch=2)
    with torch.no_grad():
        assert torch.equal(fixed(x), model(x))
        assert torch.equal(adapt(fixed).logits(x), adapter.logits(x))
    assert _state(model) == before
    assert all(torch.equal(p, table[n]) for n, p in model.embeds.named_parameters())


def test_onnx_export_at_a_size_the_model_resamples_for(tmp_path):
    import onnxruntime as ort

    from captum_vit import AGCAM
    from captum_vit.onnx import export_onnx

    model = make_family("naflex_cls")
    before = _state(model)
    x = _wide()
    cfg = {"input_size": (3, 48, 80), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "squash"}
    with one_thread():
        path = export_onnx(model, str(tmp_path / "m.onnx"), data_config=cfg)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits, cam = session.run(None, {"image": x.numpy(), "target": np.asarray(TARGETS, dtype=np.int64)})
        eager, eager_logits = AGCAM(model).attribute(x, target=TARGETS, return_logits=True)
    assert cam.shape == (3, 6, 10)
    _rel(torch.from_numpy(logits), eager_logits, rel=1e-4)
    _rel(torch.from_numpy(cam), eager, rel=1e-4)
    assert _state(model) == before


def test_onnx_export_of_the_pooled_head_refused_naming_why(tmp_path):
    from captum_vit.onnx import export_onnx

    with pytest.raises(ValueError, match=r"one-token engine.*no \[class\] token"):
        export_onnx(make_family("naflex"), str(tmp_path / "m.onnx"),
                    data_config={"input_size": (3, 64, 64), "mean": (0.5,) * 3, "std": (0.5,) * 3})


# ----------------------------------------------------------------------------- patched fallback


def test_blocks_outside_the_parts_run_the_patched_fallback():
    from timm.models.vision_transformer import ResPostBlock

    from captum_vit import AGCAM
    from captum_vit.vit import adapt

    model = _naflex(global_pool="token", class_token=True, block_fn=ResPostBlock)
    adapter = adapt(model)
    assert adapter.parts is None and "ResPostBlock" in adapter.parts_missing
    x = family_input("naflex_cls", batch=3)
    with one_thread():
        agcam = AGCAM(model)
        assert agcam.resolved_engine() == "generic"
        _rel(agcam.attribute(x, target=TARGETS), ref.agcam_batched(model, x, TARGETS))
    raise_inside_block_1_mlp(model, [AGCAM], x)


@pytest.mark.parametrize("family", ["naflex", "naflex_cls"])
def test_training_mode_with_dropout_runs_the_patched_fallback(family):
    """Training mode with the classifier's dropout active: the explanation runs the model's own forward
    (patched attention), so under the same seed it draws the mask the reference's forward draws."""
    from captum_vit import AGCAM
    from captum_vit.vit import adapt

    model = _naflex(global_pool="token", class_token=True) if family == "naflex_cls" else _naflex()
    model.head_drop.p = 0.5
    model.train()
    assert adapt(model).active_randomness() == ["head_drop"]
    query = "class" if family == "naflex_cls" else "pooled"
    x = family_input(family, batch=1)
    before = _state(model)
    with one_thread(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*training mode")
        torch.manual_seed(5)
        got = AGCAM(model, query=query).attribute(x, target=3)
        torch.manual_seed(5)
        want = ref.agcam(model, x, 3, query=query)
        torch.manual_seed(6)
        other = AGCAM(model, query=query).attribute(x, target=3)
    _rel(got.reshape(1, -1), want.reshape(1, -1))
    assert not torch.equal(got, other), "another dropout mask should give another map"
    assert _state(model) == before


# ----------------------------------------------------------------------------- LRP on the [class]-token NaFlexVit


def _as_vision_transformer(naflex):
    """The same weights in a timm VisionTransformer: conv patch embedding, position table for the patches only."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=10,
                            class_token=True, reg_tokens=1, no_embed_class=True, global_pool="token",
                            init_values=0.1).eval()
    state = {}
    for name, value in naflex.state_dict().items():
        if name == "embeds.proj.weight":  # patches flattened as (ph, pw, C)
            state["patch_embed.proj.weight"] = value.reshape(48, 8, 8, 3).permute(0, 3, 1, 2)
        elif name == "embeds.pos_embed":
            state["pos_embed"] = value.reshape(1, 64, 48)
        else:
            state[name.replace("embeds.proj.", "patch_embed.proj.").replace("embeds.", "")] = value
    vit.load_state_dict(state)
    return vit


def test_lrp_equals_the_same_weights_in_a_vision_transformer():
    from captum_vit.attr import METHODS

    # float64: the convolution and the linear patch projection round differently, which LRP's rules amplify
    model = make_family("naflex_cls").double()
    vit = _as_vision_transformer(model).double()
    x = family_input("naflex_cls", batch=3).double()
    with one_thread():
        with torch.no_grad():
            _rel(vit(x), model(x), rel=1e-10)
        for name in ("lrp", "agcam"):
            got = METHODS[name](model).attribute(x, target=TARGETS)
            _rel(got, METHODS[name](vit).attribute(x, target=TARGETS), rel=1e-10)


# ----------------------------------------------------------------------------- configurations refused


@pytest.mark.parametrize("option,value,why", [
    ("swiglu_mlp", True, "EvaBlock"),
    ("attn_gated", True, "EvaBlock"),
    ("rope_type", "axial", "rotary position embeddings"),
])
def test_eva_block_configurations_refused(option, value, why):
    from timm.models.naflexvit import NaFlexVitCfg

    from captum_vit.vit import UnsupportedModelError, adapt

    if option not in NaFlexVitCfg.__dataclass_fields__:
        pytest.skip(f"NaFlexVitCfg of this timm has no {option}")
    model = _naflex(global_pool="token", class_token=True, **{option: value})
    with pytest.raises(UnsupportedModelError, match=why):
        adapt(model)


# ----------------------------------------------------------------------------- left as found


@pytest.mark.parametrize("family", ["naflex", "naflex_cls"])
def test_model_left_as_found_when_an_exception_escapes_mid_forward(family):
    from captum_vit import AGCAM, CDAM

    model = make_family(family)
    query = "class" if family == "naflex_cls" else "pooled"
    engines = ("auto", "generic") if family == "naflex_cls" else ("generic",)
    makers = [functools.partial(AGCAM, engine=e, query=query) for e in engines] + [CDAM]
    raise_inside_block_1_mlp(model, makers, family_input(family, batch=2))
