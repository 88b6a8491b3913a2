"""AttnLRP against lxt (the authors' library) and against the independent reference of reference_attnlrp.py.

lxt's "efficient" AttnLRP patches classes: ``lxt.efficient.models.vit_torch.cp_LRP`` patches
torchvision's ``VisionTransformer`` (GELU, LayerNorm and MultiheadAttention, CP-LRP in the
attention), and its attention wrappers patch a transformers modeling module. Here a tiny
torchvision ViT is copied weight for weight into the equivalent timm ViT, and lxt's patched
torchvision model must give the same map as ``AttnLRP`` on the timm copy; lxt's own patches on
the transformers ViT module (LayerNorm, GELU, its eager attention wrapped by lxt's
``wrap_attention_forward`` / ``cp_wrap_attention_forward``) must give ``AttnLRP``'s map on that
model, for both attention rules. Every class lxt patches is restored after each run.

lxt 2.1's ``lxt.efficient`` package imports every transformers model it supports on import, some
through transformers 4 internals that transformers 5 removed; the modules these tests need
(``rules``, ``patches``, ``models.vit_torch``) import none of that, so they are loaded by path
under stand-in parent packages (see :func:`lxt_modules`).
"""

import contextlib
import copy
import importlib
import os
import sys
import types

import pytest
import torch

import reference_attnlrp as ref
from helpers import ARCHS, _state, input_for, make, make_timm, one_thread

TARGETS = [1, 7, 4]


def _close(a, b, rel):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(b.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def _differs(a, b, rel=1e-2):
    assert float((a - b).abs().max()) > rel * float(b.abs().max())


def _attnlrp(model, rule="cp"):
    from captum_vit import AttnLRP

    return AttnLRP(model, attention_rule=rule)


def _map(model, x, rule="cp", target=TARGETS):
    return _attnlrp(model, rule).attribute(x, target=target).flatten(1)


# ----------------------------------------------------------------------------- lxt


@pytest.fixture
def lxt_modules():
    """lxt's ``efficient.rules``, ``efficient.patches`` and ``efficient.models.vit_torch``, its parent
    packages stood in for while they load; ``sys.modules`` is left as it was."""
    lxt = pytest.importorskip("lxt")
    pytest.importorskip("torchvision.models.vision_transformer")
    root = os.path.dirname(lxt.__file__)
    names = ("lxt.efficient", "lxt.efficient.models", "lxt.efficient.rules", "lxt.efficient.patches",
             "lxt.efficient.models.vit_torch")
    saved = {n: sys.modules[n] for n in names if n in sys.modules}
    try:
        for name, sub in (("lxt.efficient", "efficient"),
                          ("lxt.efficient.models", os.path.join("efficient", "models"))):
            if name not in sys.modules:
                stand_in = types.ModuleType(name)
                stand_in.__path__ = [os.path.join(root, sub)]
                sys.modules[name] = stand_in
        yield types.SimpleNamespace(
            patches=importlib.import_module("lxt.efficient.patches"),
            vit_torch=importlib.import_module("lxt.efficient.models.vit_torch"),
        )
    finally:
        for n in names:
            sys.modules.pop(n, None)
        sys.modules.update(saved)


@contextlib.contextmanager
def _classes_restored(*classes):
    """Whatever lxt sets on ``classes`` (``forward``, ``original_forward``) is put back afterwards."""
    saved = [(c, {k: c.__dict__[k] for k in ("forward", "original_forward") if k in c.__dict__}) for c in classes]
    try:
        yield
    finally:
        for c, attrs in saved:
            for k in ("forward", "original_forward"):
                if k in attrs:
                    setattr(c, k, attrs[k])
                elif k in c.__dict__:
                    delattr(c, k)


def _relevance_at_first_block(model, block, x, targets, call):
    """``sum_d t * dy/dt`` at the input ``t`` of ``block``, for the patch tokens (one prefix token)."""
    captured = []
    handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with torch.enable_grad():
            out = call(x.detach().clone().requires_grad_(True))
            (g,) = torch.autograd.grad(out.gather(1, torch.tensor(targets)[:, None]).sum(), captured[0])
    finally:
        handle.remove()
    return (captured[0] * g).sum(-1)[:, 1:].detach()


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    from helpers import _perturb

    torch.manual_seed(0)
    tv = VisionTransformer(image_size=64, patch_size=8, num_layers=3, num_heads=4, hidden_dim=48, mlp_dim=96,
                           num_classes=10)
    return _perturb(tv).eval()  # torchvision initialises the head to zero


def _timm_copy(tv):
    """The timm ``VisionTransformer`` computing what the torchvision ViT ``tv`` computes, with its weights."""
    from timm.models.vision_transformer import VisionTransformer

    enc = tv.encoder
    m = VisionTransformer(img_size=tv.image_size, patch_size=tv.patch_size, embed_dim=tv.hidden_dim,
                          depth=len(enc.layers), num_heads=enc.layers[0].num_heads,
                          mlp_ratio=tv.mlp_dim / tv.hidden_dim, num_classes=tv.num_classes, qkv_bias=True).eval()
    with torch.no_grad():
        m.patch_embed.proj.load_state_dict(tv.conv_proj.state_dict())
        m.cls_token.copy_(tv.class_token)
        m.pos_embed.copy_(enc.pos_embedding)
        for blk, layer in zip(m.blocks, enc.layers):
            blk.norm1.load_state_dict(layer.ln_1.state_dict())
            blk.attn.qkv.weight.copy_(layer.self_attention.in_proj_weight)  # q, k, v stacked in both
            blk.attn.qkv.bias.copy_(layer.self_attention.in_proj_bias)
            blk.attn.proj.load_state_dict(layer.self_attention.out_proj.state_dict())
            blk.norm2.load_state_dict(layer.ln_2.state_dict())
            blk.mlp.fc1.load_state_dict(layer.mlp[0].state_dict())
            blk.mlp.fc2.load_state_dict(layer.mlp[3].state_dict())
        m.norm.load_state_dict(enc.ln.state_dict())
        m.head.load_state_dict(tv.heads.head.state_dict())
    return m


def test_cp_equals_lxt_on_torchvision_vit(lxt_modules):
    tv = _torchvision_vit()
    model = _timm_copy(tv)
    x = input_for("plain", batch=3)
    with one_thread():
        with torch.no_grad():
            _close(model(x), tv(x), rel=1e-5)  # the copy is the same function
        got, logits = _attnlrp(model).attribute(x, target=TARGETS, return_logits=True)
        plain = _relevance_at_first_block(tv, tv.encoder.layers[0], x, TARGETS, tv)  # unpatched: gradient x input
        patch_map = lxt_modules.vit_torch.cp_LRP
        with _classes_restored(*patch_map):
            for target, patch in patch_map.items():  # lxt.efficient.monkey_patch(vision_transformer), unrolled
                assert patch(target), f"lxt did not patch {target.__name__}"
            want = _relevance_at_first_block(tv, tv.encoder.layers[0], x, TARGETS, tv)
    assert all("original_forward" not in c.__dict__ for c in patch_map)
    _close(got.flatten(1), want, rel=1e-4)
    _close(logits, tv(x).detach(), rel=1e-5)
    _differs(want, plain)  # lxt's rules did change the gradient
    assert want.min() < 0 < want.max()


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
def test_equals_lxt_patches_on_transformers_vit(lxt_modules, rule):
    from transformers.activations import GELUActivation
    from transformers.models.vit import modeling_vit

    P = lxt_modules.patches
    model = make("hf")
    x = input_for("hf", batch=3)
    layer0 = model.vit.layers[0] if hasattr(model.vit, "layers") else model.vit.encoder.layer[0]

    def call(images):
        return model(pixel_values=images).logits

    wrap = P.wrap_attention_forward if rule == "attnlrp" else P.cp_wrap_attention_forward
    eager, impl = modeling_vit.eager_attention_forward, model.config._attn_implementation
    with one_thread():
        got = _map(model, x, rule)
        with _classes_restored(torch.nn.LayerNorm, GELUActivation):
            try:
                # lxt's patches as its maps for the transformers models apply them
                modeling_vit.eager_attention_forward = wrap(eager)
                assert P.patch_method(P.layer_norm_forward, torch.nn.LayerNorm)
                assert P.patch_method(P.non_linear_forward, GELUActivation, keep_original=True)
                model.config._attn_implementation = "eager"
                want = _relevance_at_first_block(model, layer0, x, TARGETS, call)
            finally:
                modeling_vit.eager_attention_forward = eager
                model.config._attn_implementation = impl
        plain = _relevance_at_first_block(model, layer0, x, TARGETS, call)
    _close(got, want, rel=1e-4)
    _differs(want, plain)


# ----------------------------------------------------------------------------- the independent reference


@pytest.mark.parametrize("rule", ["cp", "attnlrp"])
@pytest.mark.parametrize("arch", ARCHS + ["layerscale_qk"])
def test_against_reference(arch, rule):
    if arch == "layerscale_qk":  # layer scale and q/k norms together, and an attention output norm
        from timm.models.vision_transformer import VisionTransformer

        from helpers import TINY, _perturb

        torch.manual_seed(0)
        model = _perturb(VisionTransformer(**TINY, init_values=0.5, qk_norm=True, scale_attn_norm=True,
                                           scale_mlp_norm=True)).eval()
        x = input_for("plain", batch=3)
    else:
        model, x = make(arch), input_for(arch, batch=3)
    with one_thread():
        want = ref.attnlrp_batched(model, x, TARGETS, rule)
        got = _map(model, x, rule)
    _close(got, want, rel=1e-5)
    assert torch.isfinite(want).all()


@pytest.mark.parametrize("family", ["hf_deit", "hf_deit_teacher", "eva_cls", "eva_packed"])
def test_softmax_rule_on_families_against_reference(family):
    """The CP rule runs in tests/test_families.py; the AttnLRP softmax rule on rotary q/k, SwiGLU, DeiT's heads."""
    from helpers import family_input, make_family

    model, x = make_family(family), family_input(family, batch=3)
    with one_thread():
        want = ref.attnlrp_batched(model, x, TARGETS, "attnlrp")
        got = _map(model, x, "attnlrp")
        _close(got, want, rel=1e-5)
        _differs(got, _map(model, x, "cp"))


def test_rules_are_in_effect_and_class_specific():
    model = make("plain")
    x = input_for("plain", batch=3)
    with one_thread():
        cp, softmax = _map(model, x, "cp"), _map(model, x, "attnlrp")
        assert cp.min() < 0 < cp.max() and softmax.min() < 0 < softmax.max(), "AttnLRP is signed"
        _differs(cp, softmax)
        _differs(_map(model, x, "cp", [2, 2, 2]), cp)
        # against plain gradient x input at the same tokens
        plain = _relevance_at_first_block(model, model.blocks[0], x, TARGETS, model)
        _differs(cp, plain)
        _differs(softmax, plain)


def test_logits_and_target_none():
    model = make("plain")
    x = input_for("plain", batch=3)
    method = _attnlrp(model, "attnlrp")
    maps, logits = method.attribute(x, return_logits=True)
    with torch.no_grad():
        _close(logits, model(x), rel=1e-6)
    _close(maps, method.attribute(x, target=model(x).argmax(-1)), rel=1e-6)


# ----------------------------------------------------------------------------- refusals


class _Counter:
    """Patch-embedding calls: a refusal must come before any compute."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.patch_embed.register_forward_pre_hook(self._hook)

    def _hook(self, _m, _a):
        self.n += 1


class _MyNorm(torch.nn.Module):
    def forward(self, x):
        return x / x.norm(dim=-1, keepdim=True)


def _refused(case):
    from timm.models.vision_transformer import VisionTransformer

    from helpers import TINY, _perturb

    torch.manual_seed(0)
    if case in ("avg", "map", "avg_with_cls"):
        kw = {"avg": dict(class_token=False, global_pool="avg"), "map": dict(class_token=False, global_pool="map"),
              "avg_with_cls": dict(global_pool="avg")}[case]
        return _perturb(VisionTransformer(**TINY, **kw)).eval(), "pools the tokens"
    if case == "respost":
        return make_timm("respost"), "not the pre-norm timm Block"
    if case == "custom_norm":
        m = copy.deepcopy(make_timm("plain"))
        m.blocks[1].norm2 = _MyNorm()
        return m, "block 1's norm2: _MyNorm is not a LayerNorm or an RMS norm"
    if case == "softmax_after":
        return torch.nn.Sequential(make_timm("plain"), torch.nn.Softmax(-1)), "transforms the ViT's logits"
    raise KeyError(case)


@pytest.mark.parametrize("case", ["avg", "map", "avg_with_cls", "respost", "custom_norm", "softmax_after"])
def test_refuses_what_the_rules_cannot_reach_naming_what_works(case):
    from captum_vit.attr import METHODS

    model, why = _refused(case)
    vit = model[0] if isinstance(model, torch.nn.Sequential) else model
    before = _state(model)
    counter = _Counter(vit)
    try:
        with pytest.raises(ValueError) as err:
            _attnlrp(model)
    finally:
        counter.handle.remove()
    msg = str(err.value)
    assert why in msg and "AttnLRP is not defined for this model" in msg
    assert "On this model these work:" in msg and "('attnlrp'" not in msg
    assert ("CDAM ('cdam')" in msg) == (case != "respost")  # CDAM needs the parts too
    for other, cls in METHODS.items():  # every method named as working does construct
        if f"('{other}'" in msg:
            cls(model, **({"query": "pooled"} if f"('{other}', query='pooled')" in msg else {}))
    assert counter.n == 0
    assert _state(model) == before


def test_refuses_an_unknown_rule_and_an_active_dropout():
    model = make_timm("plain")
    with pytest.raises(ValueError, match=r"attention_rule must be one of \('cp', 'attnlrp'\)"):
        _attnlrp(model, "softmax")
    trained = copy.deepcopy(model).train()
    for mod in trained.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.1
    counter = _Counter(trained)
    try:
        with pytest.raises(ValueError, match="(?s)AttnLRP needs the pure forward.*dropout.*model.eval()"):
            _attnlrp(trained).attribute(input_for("plain", batch=2), target=[1, 2])
    finally:
        counter.handle.remove()
    assert counter.n == 0


def test_attnlrp_is_listed_where_it_works():
    from captum_vit.attr import METHODS
    from captum_vit.attr._base import alternatives
    from captum_vit.vit import adapt

    assert METHODS["attnlrp"] is type(_attnlrp(make_timm("plain")))
    assert "AttnLRP ('attnlrp')" in alternatives(adapt(make_timm("plain")))
