"""Hugging Face DeiT and DINOv2 beyond the family matrix (tests/test_families.py).

* Transformer Attribution (Chefer's LRP) on ``DeiTForImageClassification`` equals the independent
  reference of tests/reference_methods.py, in float64 (see tests/test_methods.py for why).
* Training mode with an active dropout runs the model's own forward with patched attention
  modules (``_patch_attention``): under one seed its logits are the model's own, dropout included,
  and with a vanishing rate its maps are the eval references'.
* An exception inside a block, on the pure forward and on the patched one, reaches the caller and
  leaves the model as it was.
* What the description reads: prefix tokens, poolings, MLP kinds, input sizes, data configs.
"""

import copy
import dataclasses
import warnings

import pytest
import torch

import reference_families as ref
import reference_methods as ref_methods
from helpers import _state, family_input, make_family, one_thread

HF_FAMILIES = ["hf_deit", "hf_deit_teacher", "hf_dinov2", "hf_dinov2_swiglu", "hf_dinov2_registers"]
QUERY = {"hf_deit": "class", "hf_deit_teacher": "class"}  # the DINOv2 ones: "pooled"
TARGETS = [1, 4, 7]


def _query(family):
    return QUERY.get(family, "pooled")


def _close(a, b, rel=1e-5):
    a, b = (torch.as_tensor(t).detach().to(torch.float64) for t in (a, b))
    scale = float(b.abs().max())
    assert scale > 0, "the reference is all zero: the comparison would prove nothing"
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def _flat(cam):
    return cam.reshape(cam.shape[0], -1)


def _with_dropout(model, attention, hidden=0.0):
    """A training-mode copy with every HF attention dropout at ``attention`` and every nn.Dropout at ``hidden``,
    on transformers' eager attention (whose dropout draws the random numbers as the patched attention does)."""
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if hasattr(mod, "attention_dropout") and hasattr(mod, "q_proj"):
            mod.attention_dropout = attention
        if isinstance(mod, torch.nn.Dropout):
            mod.p = hidden
    m.config._attn_implementation = "eager"
    return m


# ----------------------------------------------------------------------------- LRP on DeiT


def test_transformer_attribution_on_deit_equals_the_reference():
    from captum_vit import TransformerAttribution

    model = copy.deepcopy(make_family("hf_deit")).double()
    x = family_input("hf_deit", batch=3).double()
    before = _state(model)
    with one_thread():
        got = _flat(TransformerAttribution(model).attribute(x, target=TARGETS))
        want = ref_methods.transformer_attribution(model, x, TARGETS)
        assert got.shape == want.shape == (3, 64)  # the two prefix tokens dropped
        _close(got, want)
        a = TransformerAttribution(model, start_layer=1).attribute(x, target=TARGETS)
        _close(_flat(a), ref_methods.transformer_attribution(model, x, TARGETS, start_layer=1))
    assert _state(model) == before


def test_transformer_attribution_refuses_the_teacher_and_dinov2_naming_what_works():
    from captum_vit import TransformerAttribution

    with pytest.raises(ValueError, match="(?s)averages several heads.*On this model these work:.*AGCAM"):
        TransformerAttribution(make_family("hf_deit_teacher"))
    with pytest.raises(ValueError, match=r"(?s)'token\+avg' \(the \[class\] token concatenated with the mean of the "
                                         r"patch tokens\).*query='pooled'\)"):
        TransformerAttribution(make_family("hf_dinov2"))


# ----------------------------------------------------------------------------- the patched fallback


@pytest.mark.parametrize("family", HF_FAMILIES)
def test_training_mode_dropout_runs_the_models_own_forward(family):
    """Under one seed the fallback's logits are those of the model's own training-mode forward (dropout included)."""
    from captum_vit.vit import Request, adapt

    model = _with_dropout(make_family(family), attention=0.3, hidden=0.2)
    x = family_input(family, batch=2)
    adapter = adapt(model)
    assert adapter.active_randomness()
    with one_thread(), torch.no_grad():
        torch.manual_seed(5)
        rec = adapter.forward(x, Request(attention="keep", values=True))
        torch.manual_seed(5)
        own = model(pixel_values=x).logits
        torch.manual_seed(6)
        other = adapter.logits(x)
    _close(rec.logits, own, rel=1e-5)
    assert (other - own).abs().max() > 1e-3, "the dropout is not active: the test would prove nothing"
    assert len(rec.attention) == len(rec.values) == adapter.num_layers
    # the recorded attention is the softmax (before the dropout): its rows sum to 1
    _close(rec.attention[0].sum(-1), torch.ones_like(rec.attention[0].sum(-1)))
    assert all("forward" not in m.__dict__ for m in model.modules())


@pytest.mark.filterwarnings("ignore:.*training mode")
@pytest.mark.parametrize("family", HF_FAMILIES)
@pytest.mark.parametrize("name", ["agcam", "gae"])
def test_patched_fallback_equals_the_reference(family, name):
    """With a vanishing attention-dropout rate the fallback runs, and its maps are the eval references'."""
    from captum_vit.attr import METHODS

    eval_model = make_family(family)
    model = _with_dropout(eval_model, attention=1e-12)
    x = family_input(family, batch=2)
    reference = {"agcam": ref.agcam_batched, "gae": ref.gae_batched}[name]
    with one_thread():
        method = METHODS[name](model, query=_query(family))
        if name == "agcam":
            assert method.resolved_engine() == "generic"  # the one-token engine needs the pure forward
        before = _state(model)
        got = _flat(method.attribute(x, target=TARGETS[:2]))
        assert _state(model) == before
        want = reference(eval_model, x, TARGETS[:2], query=_query(family))
    _close(got, want)


@pytest.mark.parametrize("family", ["hf_deit", "hf_dinov2_swiglu"])
def test_pure_forward_methods_refuse_an_active_dropout(family):
    from captum_vit import CDAM

    model = _with_dropout(make_family(family), attention=0.1)
    with pytest.raises(ValueError, match="(?s)dropout.*model.eval()"):
        CDAM(model).attribute(family_input(family, batch=1), target=1)


# ----------------------------------------------------------------------------- exceptions leave the model as found


@pytest.mark.filterwarnings("ignore:.*training mode")
@pytest.mark.parametrize("family", ["hf_deit_teacher", "hf_dinov2_swiglu", "hf_dinov2_registers"])
@pytest.mark.parametrize("mode", ["eval", "dropout"])
def test_an_exception_inside_a_block_leaves_the_model_as_found(family, mode):
    from captum_vit import AGCAM, CDAM, AttentionRollout
    from captum_vit.vit import adapt

    model = make_family(family) if mode == "eval" else _with_dropout(make_family(family), attention=0.1)
    query = _query(family)
    makers = [lambda m: AGCAM(m, query=query), lambda m: AttentionRollout(m, query=query)]
    if mode == "eval":
        makers.append(CDAM)
    x = family_input(family, batch=2)
    before = _state(model)
    mlp = adapt(model).blocks[1].mlp
    first = next(c for c in mlp.children() if isinstance(c, torch.nn.Linear))  # fc1, or the SwiGLU's gate

    def boom(_m, _args):
        raise RuntimeError("boom")

    handle = first.register_forward_pre_hook(boom)
    try:
        for make in makers:
            with pytest.raises(RuntimeError, match="boom"):
                make(model).attribute(x, target=[1, 2])
    finally:
        handle.remove()
    assert _state(model) == before
    with torch.no_grad():  # and it still runs as before
        if mode == "eval":
            _close(adapt(model).logits(x), ref.logits_batched(model, x))


# ----------------------------------------------------------------------------- what the description reads


@pytest.mark.parametrize(
    "family,prefix,pooling,mlp",
    [
        ("hf_deit", 2, "token", "Mlp"),
        ("hf_deit_teacher", 2, "token_distill", "Mlp"),
        ("hf_dinov2", 1, "token+avg", "Mlp"),
        ("hf_dinov2_swiglu", 1, "token+avg", "GluMlp"),
        ("hf_dinov2_registers", 3, "token+avg", "Mlp"),
    ],
)
def test_description(family, prefix, pooling, mlp):
    from captum_vit.vit import adapt

    model = make_family(family)
    a = adapt(model)
    assert a.library == "transformers"
    assert (a.num_prefix_tokens, a.pooling, type(a.parts[0].mlp).__name__) == (prefix, pooling, mlp)
    assert a.head.pool_from == prefix
    assert a.num_layers == model.config.num_hidden_layers and a.num_classes == model.config.num_labels
    one_token, why = a.one_token_support()
    assert one_token == (pooling != "token+avg"), why
    if pooling == "token+avg":
        assert a.parts[0].ls1 is not None and a.parts[0].ls2 is not None  # DINOv2's layer scale
        assert "query='pooled'" in _refusal(model)


def _refusal(model):
    from captum_vit import AGCAM

    with pytest.raises(ValueError) as err:
        AGCAM(model)
    return str(err.value)


def test_swiglu_gate_value_order_and_vjp():
    """DINOv2's SwiGLU is ``down(silu(gate(x)) * up(x))``: the parts' forward and VJP are the module's, autograd's."""
    from captum_vit.vit import adapt

    model = make_family("hf_dinov2_swiglu")
    layer = adapt(model).blocks[0]
    parts = adapt(model).parts[0].mlp
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mod = copy.deepcopy(layer.mlp).double()
    parts = dataclasses.replace(parts, fc_gate=mod.gate_proj, fc_value=mod.up_proj, fc2=mod.down_proj)
    _close(parts(x), mod(x), rel=1e-12)
    g = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    want = torch.autograd.grad(mod(xg), xg, g)[0]
    _close(parts.vjp(x, g), want, rel=1e-10)


def test_packed_swiglu_layout_gate_first():
    """The packed layout (``weights_in`` split in halves, the first the gate) reads as ``GluMlp(gate_last=False)``."""
    from captum_vit.vit.hf_dinov2 import dinov2_mlp

    class Packed(torch.nn.Module):  # transformers' earlier Dinov2SwiGLUFFN
        def __init__(self):
            super().__init__()
            self.weights_in = torch.nn.Linear(6, 2 * 8)
            self.weights_out = torch.nn.Linear(8, 6)

        def forward(self, x):
            x1, x2 = self.weights_in(x).chunk(2, dim=-1)
            return self.weights_out(torch.nn.functional.silu(x1) * x2)

    torch.manual_seed(0)
    mod = Packed().double()
    parts, why = dinov2_mlp(mod)
    assert parts is not None, why
    x = torch.randn(4, 6, dtype=torch.float64)
    _close(parts(x), mod(x), rel=1e-12)
    g = torch.randn(4, 6, dtype=torch.float64)
    xg = x.clone().requires_grad_(True)
    _close(parts.vjp(x, g), torch.autograd.grad(mod(xg), xg, g)[0], rel=1e-10)
    assert dinov2_mlp(torch.nn.Identity())[0] is None


def test_input_sizes():
    from captum_vit import AGCAM

    deit, dinov2 = make_family("hf_deit"), make_family("hf_dinov2_registers")
    with pytest.raises(ValueError, match="config.image_size"):
        AGCAM(deit).attribute(torch.randn(1, 3, 48, 64), target=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size"):
        AGCAM(dinov2, query="pooled").attribute(torch.randn(1, 3, 60, 64), target=1)
    # DINOv2 interpolates its positional embeddings: a non-square multiple of the patch size is taken
    x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(3))
    with one_thread():
        cam = AGCAM(dinov2, query="pooled").attribute(x, target=[1, 2])
        assert cam.shape == (2, 1, 6, 10)
        _close(_flat(cam), ref.agcam_batched(dinov2, x, [1, 2], query="pooled"))


def test_data_config_and_refused_headless_models():
    import transformers

    from captum_vit.models import data_config_for
    from captum_vit.vit import UnsupportedModelError, adapt

    cfg = data_config_for(make_family("hf_deit"))
    assert cfg["input_size"] == (3, 64, 64) and cfg["mean"] == (0.485, 0.456, 0.406) and cfg["crop_pct"] == 0.875
    cfg = data_config_for(make_family("hf_dinov2"))
    assert cfg["input_size"] == (3, 64, 64) and cfg["std"] == (0.229, 0.224, 0.225) and cfg["crop_mode"] == "center"
    headless = transformers.DeiTForImageClassification(transformers.DeiTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=0))
    with pytest.raises(UnsupportedModelError, match="num_labels > 0"):
        adapt(headless)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(adapt(make_family("hf_dinov2"))).__name__ == "HFDinov2Adapter"
