import functools

import pytest
import torch

from captum_vit import AGCAM
from captum_vit.vit import UnsupportedModelError, adapt
from helpers import ARCHS, _close, _state, input_for, make, make_timm, raise_inside_block_1_mlp
from reference import agcam_reference, logits_reference


@pytest.mark.parametrize("arch", ARCHS)
def test_paper_exact_against_reference(arch):
    model = make(arch)
    x = input_for(arch, batch=3)
    targets = [1, 7, 4]
    ref = agcam_reference(model, x, targets)
    assert ref.max() > 0, "reference map is all zero: the test would be vacuous"
    for engine in ("generic", "auto"):
        cam = AGCAM(model, engine=engine).attribute(x, target=targets)
        gh, gw = adapt(model).grid_size(x)
        assert cam.shape == (3, 1, gh, gw)
        _close(cam.reshape(3, -1), ref)


@pytest.mark.parametrize("arch", ARCHS)
def test_engines_agree_and_one_token_is_default(arch):
    model = make(arch)
    x = input_for(arch, batch=4, seed=3)
    agcam = AGCAM(model)
    assert agcam.resolved_engine() == "one_token"
    a = AGCAM(model, engine="one_token").attribute(x, target=torch.tensor([0, 3, 5, 9]))
    b = AGCAM(model, engine="generic").attribute(x, target=torch.tensor([0, 3, 5, 9]))
    _close(a, b)


def test_reference_logits_match_model():
    # Guards the reference itself: its hand-written forward must equal the model's forward.
    for arch in ARCHS:
        model = make(arch)
        x = input_for(arch, batch=2)
        out = adapt(model).logits(x)
        _close(logits_reference(model, x), out.detach(), rel=1e-4)


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("arch", ["plain", "distilled", "hf"])
def test_batches_equal_per_image(arch, batch):
    model = make(arch)
    x = input_for(arch, batch=batch, seed=batch)
    targets = [(3 * i + 1) % 10 for i in range(batch)]
    agcam = AGCAM(model)
    batched = agcam.attribute(x, target=targets)
    single = torch.cat([agcam.attribute(x[i : i + 1], target=targets[i]) for i in range(batch)])
    _close(batched, single)


def test_fallback_to_generic_engine():
    model = make_timm("scale_norm")
    x = input_for("plain", batch=2)
    agcam = AGCAM(model)
    assert agcam.resolved_engine() == "generic"
    _close(agcam.attribute(x, target=[2, 5]).reshape(2, -1), agcam_reference(model, x, [2, 5]))
    with pytest.raises(ValueError, match="one_token"):
        AGCAM(model, engine="one_token")


def test_no_detach_variant_matches_plain_autograd_and_differs():
    model = make_timm("plain")
    x = input_for("plain", batch=2)
    cam = AGCAM(model, detach=False).attribute(x, target=[1, 2]).reshape(2, -1)
    _close(cam, agcam_reference(model, x, [1, 2], detach=False))
    assert (cam - AGCAM(model).attribute(x, target=[1, 2]).reshape(2, -1)).abs().max() > 1e-4


def test_target_none_is_predicted_class_and_fusions_and_layers():
    model = make_timm("plain")
    x = input_for("plain", batch=3)
    pred = model(x).argmax(1)
    _close(AGCAM(model).attribute(x), AGCAM(model).attribute(x, target=pred))
    ref_last = agcam_reference(model, x, pred.tolist(), layers=[2])
    _close(AGCAM(model, layers=[-1]).attribute(x).reshape(3, -1), ref_last)
    s = AGCAM(model).attribute(x)
    m = AGCAM(model, layer_fusion="mean", head_fusion="mean").attribute(x)
    _close(m * 3 * 4, s)
    mx = AGCAM(model, head_fusion="max", layer_fusion="max").attribute(x)
    assert (mx <= s + 1e-6).all() and mx.max() > 0


def test_target_forms():
    model = make_timm("plain")
    x = input_for("plain", batch=2)
    a = AGCAM(model)
    base = a.attribute(x, target=[4, 4])
    for t in (4, (4,), torch.tensor(4), torch.tensor([4, 4]), [(4,), (4,)]):
        _close(a.attribute(x, target=t), base)


def test_upsample_to_input():
    model = make_timm("dynamic")
    x = input_for("dynamic", batch=2)
    a = AGCAM(model)
    cam = a.attribute(x, target=1)
    up = a.attribute(x, target=1, upsample_to_input=True)
    assert up.shape == (2, 1, 48, 80)
    _close(up, torch.nn.functional.interpolate(cam, size=(48, 80), mode="bilinear", align_corners=False))


def test_works_under_no_grad():
    model = make_timm("layerscale")
    x = input_for("plain", batch=2)
    expected = AGCAM(model, engine="generic").attribute(x, target=[1, 2])
    with torch.no_grad():
        for engine in ("generic", "one_token"):
            _close(AGCAM(model, engine=engine).attribute(x, target=[1, 2]), expected)


# ------------------------------------------------------------------ leaves the model as found
@pytest.mark.parametrize("arch", ["plain", "hf"])
@pytest.mark.parametrize("engine", ["one_token", "generic"])
def test_model_left_as_found(arch, engine):
    model = make(arch)
    for p in list(model.parameters())[::2]:  # a mixed requires_grad pattern must survive
        p.requires_grad_(False)
    x = input_for(arch, batch=2)
    before = _state(model)
    AGCAM(model, engine=engine).attribute(x, target=[1, 2])
    assert _state(model) == before
    with pytest.raises(ValueError, match="out of range"):
        AGCAM(model, engine=engine).attribute(x, target=[1, 99])
    assert _state(model) == before


@pytest.mark.parametrize("arch", ["plain", "respost", "hf"])
def test_model_left_as_found_when_an_exception_escapes_mid_forward(arch):
    # "respost" runs the patched fallback, the others the pure forward; a user's hook raising
    # inside block 1's MLP must leave no patched forward or hook of ours behind either way.
    model = make(arch)
    x = input_for(arch, batch=2)
    raise_inside_block_1_mlp(model, [functools.partial(AGCAM, engine=engine) for engine in ("auto", "generic")], x)


def test_fused_attention_flag_kept_and_restored():
    model = make_timm("plain")
    flags = [blk.attn.fused_attn for blk in model.blocks]
    assert all(flags), "timm enables fused attention by default on torch>=2"
    for blk in model.blocks[:1]:
        blk.attn.fused_attn = False  # mixed flags
    x = input_for("plain", batch=2)
    ref = agcam_reference(model, x, [1, 2])
    _close(AGCAM(model).attribute(x, target=[1, 2]).reshape(2, -1), ref)
    assert [blk.attn.fused_attn for blk in model.blocks] == [False] + flags[1:]


@pytest.mark.parametrize("arch", ["respost", "scale_norm"])
def test_architectures_outside_the_one_token_engine(arch):
    # respost: blocks the description does not cover (patched fallback); scale_norm: covered by
    # the parts, but the one-token chain does not apply.
    model = make_timm(arch)
    x = input_for("plain", batch=3)
    agcam = AGCAM(model)
    assert agcam.resolved_engine() == "generic"
    assert (adapt(model).parts is None) == (arch == "respost")
    ref = agcam_reference(model, x, [1, 5, 8])
    assert ref.max() > 0
    _close(agcam.attribute(x, target=[1, 5, 8]).reshape(3, -1), ref)


def test_inference_mode():
    model = make_timm("layerscale")
    x = input_for("plain", batch=2)
    ref = agcam_reference(model, x, [3, 6])
    with torch.inference_mode():
        xi = x.clone()
        cam = AGCAM(model).attribute(xi, target=[3, 6])
        with pytest.raises(RuntimeError, match="inference_mode.*no_grad"):
            AGCAM(model, engine="generic").attribute(xi, target=[3, 6])
    _close(cam.reshape(2, -1), ref)
    # An inference tensor made earlier still works with the autograd engine outside the mode.
    _close(AGCAM(model, engine="generic").attribute(xi, target=[3, 6]).reshape(2, -1), ref)


def test_numpy_targets_and_bool_layers():
    np = pytest.importorskip("numpy")
    model = make_timm("plain")
    x = input_for("plain", batch=2)
    a = AGCAM(model)
    base = a.attribute(x, target=[1, 2])
    _close(a.attribute(x, target=np.array([1, 2])), base)
    _close(a.attribute(x, target=[np.int64(1), np.int32(2)]), base)
    _close(a.attribute(x, target=np.int64(3)), a.attribute(x, target=3))
    with pytest.raises(TypeError, match="integer"):
        a.attribute(x, target=np.array([1.0, 2.0]))
    with pytest.raises(TypeError, match="layer index"):
        AGCAM(model, layers=[True])
    last = AGCAM(model, layers=[2]).attribute(x, target=[1, 2])
    _close(AGCAM(model, layers=[np.int64(-1)]).attribute(x, target=[1, 2]), last)


def test_return_logits_come_from_the_same_forward():
    model = make("hf")
    x = input_for("hf", batch=3)
    cam, logits = AGCAM(model).attribute(x, return_logits=True)
    _close(logits, logits_reference(model, x), rel=1e-4)
    _close(cam, AGCAM(model).attribute(x, target=logits.argmax(1)))
    (cam_t,), _ = AGCAM(model).attribute((x,), target=1, return_logits=True)
    assert cam_t.shape == cam.shape


class _Normalize(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.5, 0.25, 0.75]).view(1, 3, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


@pytest.mark.parametrize("arch", ["plain", "hf"])
def test_wrappers_are_explained_through_their_forward(arch):
    vit = make(arch)
    x = input_for(arch, batch=3).abs()
    ref = agcam_reference(vit, _Normalize()(x), [2, 4, 6])
    seq = torch.nn.Sequential(_Normalize(), vit)
    a = AGCAM(seq)
    assert a.resolved_engine() == "one_token"
    _close(a.attribute(x, target=[2, 4, 6]).reshape(3, -1), ref)
    _close(AGCAM(seq, engine="generic").attribute(x, target=[2, 4, 6]).reshape(3, -1), ref)
    compiled = torch.compile(vit)
    _close(AGCAM(compiled).attribute(_Normalize()(x), target=[2, 4, 6]).reshape(3, -1), ref)
    _close(AGCAM(torch.compile(seq)).attribute(x, target=[2, 4, 6]).reshape(3, -1), ref)
    # Something after the ViT: its output is no longer the ViT's logits, so autograd explains it.
    doubled = torch.nn.Sequential(_Normalize(), vit, torch.nn.Softmax(-1))
    d = AGCAM(doubled)
    assert d.resolved_engine() == "generic"
    probs = logits_reference(vit, _Normalize()(x)).softmax(-1)
    _, out = d.attribute(x, target=[2, 4, 6], return_logits=True)
    _close(out, probs.detach(), rel=1e-5)


def test_other_wrappers_are_refused_naming_the_inner_vit():
    class Wrapper(torch.nn.Module):
        def __init__(self, vit):
            super().__init__()
            self.backbone = vit

        def forward(self, x):
            return self.backbone(x * 2)

    with pytest.raises(UnsupportedModelError, match="model.backbone"):
        AGCAM(Wrapper(make_timm("plain")))
    with pytest.raises(UnsupportedModelError, match="wraps a Vision Transformer"):
        AGCAM(torch.nn.Sequential(make_timm("plain"), make_timm("plain")))


def test_train_mode_warns_and_is_not_switched():
    model = make_timm("plain").train()
    x = input_for("plain", batch=2)
    with pytest.warns(UserWarning, match="training mode"):
        cam = AGCAM(model).attribute(x, target=[1, 2])
    assert model.training and all(m.training for m in model.modules())
    assert torch.isfinite(cam).all()


# ------------------------------------------------------------------ bad input
def test_bad_inputs_have_clear_errors():
    model = make_timm("plain")
    a = AGCAM(model)
    with pytest.raises(ValueError, match="batch dimension"):
        a.attribute(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="channels"):
        a.attribute(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="fixed input size"):
        a.attribute(torch.randn(1, 3, 96, 96))
    with pytest.raises(ValueError, match="NaN"):
        a.attribute(torch.full((1, 3, 64, 64), float("nan")))
    with pytest.raises(ValueError, match="out of range"):
        a.attribute(torch.randn(2, 3, 64, 64), target=10)
    with pytest.raises(ValueError, match="2 samples"):
        a.attribute(torch.randn(2, 3, 64, 64), target=[1, 2, 3])
    with pytest.raises(ValueError, match="batch of 2"):
        a.attribute(torch.randn(2, 3, 64, 64), target=torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="tuple target"):
        a.attribute(torch.randn(2, 3, 64, 64), target=(1, 2))
    with pytest.raises(TypeError, match="floating-point"):
        a.attribute(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(TypeError, match="dtype"):
        a.attribute(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with pytest.raises(ValueError, match="layer index"):
        AGCAM(model, layers=[5])
    with pytest.raises(ValueError, match="head_fusion"):
        AGCAM(model, head_fusion="median")
    dyn = make_timm("dynamic")
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        AGCAM(dyn).attribute(torch.randn(1, 3, 60, 64))


def test_unsupported_models():
    with pytest.raises(UnsupportedModelError, match="not a supported Vision Transformer"):
        AGCAM(torch.nn.Linear(3, 3))
    import timm

    with pytest.raises(UnsupportedModelError, match="not a supported Vision Transformer"):
        AGCAM(timm.create_model("resnet18", pretrained=False, num_classes=3))
    with pytest.raises(ValueError, match="no \\[class\\] token"):
        AGCAM(make_timm("avgpool"))
    from timm.models.vision_transformer import VisionTransformer

    with pytest.raises(ValueError, match="pools tokens with 'avg'"):
        AGCAM(VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1, num_heads=2, global_pool="avg"))
