"""The baseline methods against the independent references of reference_methods.py.

Every comparison is at 1e-5 relative to max |reference|, on batches of 3 with mixed targets.
Transformer Attribution (Chefer's LRP) is compared in float64: its Add rule divides by sums that
can nearly cancel, so two correct float32 implementations differ by up to ~1e-2 relative on these
tiny random models (measured: float32 vs float64 of the reference itself).
"""

import copy
from functools import cache

import pytest
import torch

import reference_methods as ref
from helpers import ARCHS, TINY, _close, _perturb, _state, input_for, make, raise_inside_block_1_mlp

TARGETS = [1, 7, 4]
# The reference LRP covers [class]-token pooling only, not the distilled two-head average.
LRP_ARCHS = [a for a in ARCHS if a != "distilled"]
GRID = {"dynamic": (6, 10), "convstem": (4, 4)}  # others: 64x64 input, patch 8


def _api(name):
    import captum_vit

    return getattr(captum_vit, name)


@cache
def _cached(arch):
    return make(arch)


def _model(arch, double=False):
    """A shared (read-only) tiny model; a private float64 copy when ``double``."""
    m = _cached(arch)
    return copy.deepcopy(m).double() if double else m


def _flat(cam, arch, batch=3):
    gh, gw = GRID.get(arch, (8, 8))
    assert cam.shape == (batch, 1, gh, gw), cam.shape
    assert cam.dtype.is_floating_point
    return cam.detach().reshape(batch, -1)


def _n_tokens(model, arch):
    gh, gw = GRID.get(arch, (8, 8))
    return gh * gw + (model.num_prefix_tokens if hasattr(model, "patch_embed") else 1)


def _dim(model):
    return model.embed_dim if hasattr(model, "patch_embed") else model.config.hidden_size


def _nontrivial(r):
    assert r.abs().max() > 0, "reference map is all zero: the test would be vacuous"
    assert torch.isfinite(r).all()


def _signed(r):
    _nontrivial(r)
    assert r.min() < 0 < r.max(), "CDAM reference should show evidence and counter-evidence"


# ----------------------------------------------------------------------------- references themselves


def test_reference_forward_matches_model():
    for arch in ARCHS:
        model = _model(arch)
        x = input_for(arch, batch=2)
        with torch.no_grad():
            out = model(x)
        out = getattr(out, "logits", out)
        _close(ref.logits_reference(model, x), out, rel=1e-4)


def test_reference_rollout_rows_and_lrp_one_hot_sanity():
    model = _model("plain")
    x = input_for("plain", batch=1)
    # rollout of row-stochastic matrices: the [class] row sums to 1 over all keys, prefix included
    r = ref.rollout(model, x)
    assert r.sum() < 1 and r.min() > 0
    # the LRP relevance of different targets differs (it is class-specific)
    a = ref.transformer_attribution(_model("plain", double=True), x.double(), [1])
    b = ref.transformer_attribution(_model("plain", double=True), x.double(), [7])
    assert (a - b).abs().max() > 1e-3 * a.abs().max()


# ----------------------------------------------------------------------------- attention rollout / raw


@pytest.mark.parametrize(
    "arch,fusion,discard",
    [(a, "mean", 0.0) for a in ARCHS] + [(a, "max", 0.9) for a in ARCHS]
    + [(a, f, d) for a in ("plain", "registers", "hf") for f, d in (("min", 0.5), ("mean", 0.3))],
)
def test_rollout_against_reference(arch, fusion, discard):
    model = _model(arch)
    x = input_for(arch, batch=3)
    r = ref.rollout(model, x, head_fusion=fusion, discard_ratio=discard)
    _nontrivial(r)
    cam = _api("AttentionRollout")(model, head_fusion=fusion, discard_ratio=discard).attribute(x)
    _close(_flat(cam, arch), r)


def test_rollout_ignores_target():
    model = _model("plain")
    x = input_for("plain", batch=3)
    method = _api("AttentionRollout")(model)
    a = method.attribute(x, target=TARGETS)
    b = method.attribute(x, target=[0, 0, 9])
    c = method.attribute(x)
    assert torch.equal(a, b) and torch.equal(a, c)


def test_rollout_defaults_are_the_papers_not_vit_explain():
    # the published rollout: mean fusion, discard 0 (vit-explain's own defaults are max / 0.9)
    model = _model("plain")
    x = input_for("plain", batch=3)
    _close(_flat(_api("AttentionRollout")(model).attribute(x), "plain"), ref.rollout(model, x))


@pytest.mark.parametrize("arch", ARCHS)
def test_raw_attention_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    r = ref.raw_attention(model, x)
    _nontrivial(r)
    _close(_flat(_api("RawAttention")(model).attribute(x, target=TARGETS), arch), r)
    _close(_flat(_api("RawAttention")(model).attribute(x), arch), r)


# ----------------------------------------------------------------------------- GAE (Chefer ICCV 2021)


@pytest.mark.parametrize("arch", ARCHS)
def test_gae_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    r = ref.gae(model, x, TARGETS)
    _nontrivial(r)
    _close(_flat(_api("GradientAttentionRollout")(model).attribute(x, target=TARGETS), arch), r)


# ----------------------------------------------------------------------------- Transformer Attribution (LRP)


@pytest.mark.parametrize("start_layer", [0, 1])
@pytest.mark.parametrize("arch", LRP_ARCHS)
def test_transformer_attribution_against_reference(arch, start_layer):
    model = _model(arch, double=True)
    x = input_for(arch, batch=3).double()
    r = ref.transformer_attribution(model, x, TARGETS, start_layer=start_layer)
    _nontrivial(r)
    cam = _api("TransformerAttribution")(model, start_layer=start_layer).attribute(x, target=TARGETS)
    _close(_flat(cam, arch), r)


@pytest.mark.parametrize("arch", ["plain", "hf"])
def test_transformer_attribution_final_norm_eps(arch):
    # default: Chefer's final LayerNorm eps 1e-5; None: the model's own final norm
    model = _model(arch, double=True)
    x = input_for(arch, batch=3).double()
    T = _api("TransformerAttribution")
    _close(_flat(T(model).attribute(x, target=TARGETS), arch), ref.transformer_attribution(model, x, TARGETS))
    r = ref.transformer_attribution(model, x, TARGETS, final_norm_eps=None)
    _close(_flat(T(model, final_norm_eps=None).attribute(x, target=TARGETS), arch), r)
    r = ref.transformer_attribution(model, x, TARGETS, start_layer=1, final_norm_eps=1e-3)
    _close(_flat(T(model, start_layer=1, final_norm_eps=1e-3).attribute(x, target=TARGETS), arch), r)


def test_transformer_attribution_float32_close():
    # float32 runs and lands near the float64 reference (LRP is ill-conditioned: loose tolerance)
    model = _model("plain")
    x = input_for("plain", batch=3)
    cam = _api("TransformerAttribution")(model).attribute(x, target=TARGETS)
    assert cam.dtype == torch.float32
    r = ref.transformer_attribution(_model("plain", double=True), x.double(), TARGETS).float()
    _close(_flat(cam, "plain"), r, rel=1e-3)


# ----------------------------------------------------------------------------- CDAM


@pytest.mark.parametrize("arch", ARCHS)
def test_cdam_class_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    r = ref.cdam(model, x, TARGETS)
    _signed(r)
    _close(_flat(_api("CDAM")(model).attribute(x, target=TARGETS), arch), r)


@pytest.mark.parametrize("arch", ["plain", "registers", "distilled", "hf"])
def test_cdam_concept_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    examples = input_for(arch, batch=4, seed=7)
    vec = ref.class_embedding(model, examples).mean(0)
    assert vec.shape == (_dim(model),)
    r = ref.cdam(model, x, concept=vec)
    _signed(r)
    C = _api("CDAM")(model)
    _close(_flat(C.attribute(x, concept=vec), arch), r)
    # a concept given as example images is their mean [class] embedding
    _close(_flat(C.attribute(x, concept=examples), arch), r)
    _close(C.attribute(x, concept=examples), C.attribute(x, concept=vec))


@pytest.mark.parametrize("arch", ["plain", "distilled", "hf"])
def test_cdam_target_fn_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    w = torch.linspace(-1, 1, _dim(model))

    def fn(emb):  # [B, D] -> [B], per sample
        return (torch.tanh(emb) * w).sum(-1) + (emb**2).mean(-1)

    r = ref.cdam(model, x, fn=fn)
    _signed(r)
    _close(_flat(_api("CDAM")(model).attribute(x, target_fn=fn), arch), r)


@pytest.mark.parametrize("arch", ["plain", "layerscale", "registers", "hf"])
def test_smooth_cdam_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    n = 4
    g = torch.Generator().manual_seed(11)
    noise = torch.randn(n, 3, _n_tokens(model, arch), _dim(model), generator=g)
    r = ref.smooth_cdam(model, x, TARGETS, noise, noise_level=0.05)
    _signed(r)
    assert (r - ref.cdam(model, x, TARGETS)).abs().max() > 1e-3 * r.abs().max(), "noise had no effect"
    C = _api("CDAM")
    smooth = C(model, variant="smooth", n_samples=n, noise_level=0.05)
    _close(_flat(smooth.attribute(x, target=TARGETS, noise=noise), arch), r)
    r2 = ref.smooth_cdam(model, x, TARGETS, noise, noise_level=0.2)
    smooth = C(model, variant="smooth", n_samples=n, noise_level=0.2)
    _close(_flat(smooth.attribute(x, target=TARGETS, noise=noise), arch), r2)


def test_smooth_cdam_draws_its_own_noise():
    model = _model("plain")
    x = input_for("plain", batch=3)
    C = _api("CDAM")
    # zero noise level: every sample is plain CDAM
    _close(_flat(C(model, variant="smooth", n_samples=3, noise_level=0.0).attribute(x, target=TARGETS), "plain"),
           ref.cdam(model, x, TARGETS))
    cam = C(model, variant="smooth", n_samples=3).attribute(x, target=TARGETS)
    assert torch.isfinite(cam).all() and cam.shape == (3, 1, 8, 8)


@pytest.mark.parametrize("arch", ["plain", "qk_norm", "distilled", "dynamic", "hf"])
def test_integrated_cdam_against_reference(arch):
    model = _model(arch)
    x = input_for(arch, batch=3)
    r = ref.integrated_cdam(model, x, TARGETS, n_steps=5)
    _signed(r)
    cam = _api("CDAM")(model, variant="integrated", n_steps=5).attribute(x, target=TARGETS)
    _close(_flat(cam, arch), r)


# ----------------------------------------------------------------------------- all methods: batching, targets, state

CASES = {
    "rollout": lambda m: _api("AttentionRollout")(m),
    "rollout_max": lambda m: _api("AttentionRollout")(m, head_fusion="max", discard_ratio=0.9),
    "raw": lambda m: _api("RawAttention")(m),
    "gae": lambda m: _api("GradientAttentionRollout")(m),
    "transformer_attribution": lambda m: _api("TransformerAttribution")(m, start_layer=1),
    "cdam": lambda m: _api("CDAM")(m),
    "cdam_smooth": lambda m: _api("CDAM")(m, variant="smooth", n_samples=3),
    "cdam_integrated": lambda m: _api("CDAM")(m, variant="integrated", n_steps=4),
    "attnlrp": lambda m: _api("AttnLRP")(m),
    "attnlrp_softmax": lambda m: _api("AttnLRP")(m, attention_rule="attnlrp"),
}
TARGETED = {"gae", "transformer_attribution", "cdam", "cdam_smooth", "cdam_integrated", "attnlrp", "attnlrp_softmax"}


def _call(name, method, x, target, noise=None):
    if name == "cdam_smooth":
        return method.attribute(x, target=target, noise=noise)
    return method.attribute(x, target=target)


@pytest.mark.parametrize("arch", ["plain", "hf"])
@pytest.mark.parametrize("name", list(CASES))
def test_batched_equals_per_image(name, arch):
    double = name == "transformer_attribution"
    model = _model(arch, double=double)
    x = input_for(arch, batch=3, seed=5)
    if double:
        x = x.double()
    noise = None
    if name == "cdam_smooth":
        noise = torch.randn(3, 3, _n_tokens(model, arch), _dim(model), generator=torch.Generator().manual_seed(2))
    method = CASES[name](model)
    batched = _call(name, method, x, TARGETS, noise)
    single = torch.cat([
        _call(name, method, x[i : i + 1], TARGETS[i], None if noise is None else noise[:, i : i + 1])
        for i in range(3)
    ])
    assert batched.shape == single.shape == (3, 1, 8, 8)
    _close(batched, single)


@pytest.mark.parametrize("name", ["gae", "transformer_attribution", "cdam", "attnlrp"])
def test_target_none_is_predicted_class(name):
    model = _model("plain")
    x = input_for("plain", batch=3)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    method = CASES[name](model)
    _close(method.attribute(x), method.attribute(x, target=pred))


@pytest.mark.parametrize("arch", ["plain", "hf"])
@pytest.mark.parametrize("name", list(CASES))
def test_model_left_as_found(name, arch):
    model = make(arch)
    for p in list(model.parameters())[::2]:  # a mixed requires_grad pattern must survive
        p.requires_grad_(False)
    x = input_for(arch, batch=2)
    before = _state(model)
    method = CASES[name](model)
    method.attribute(x, target=[1, 2])
    assert _state(model) == before
    if name in TARGETED:
        with pytest.raises(ValueError, match="out of range"):
            method.attribute(x, target=[1, 99])
        assert _state(model) == before


@pytest.mark.parametrize("arch", ["plain", "hf"])
@pytest.mark.parametrize("name", list(CASES))
def test_model_left_as_found_when_an_exception_escapes_mid_forward(name, arch):
    model = make(arch)
    x = input_for(arch, batch=2)
    before = raise_inside_block_1_mlp(model, [CASES[name]], x)
    # and the method still works afterwards
    CASES[name](model).attribute(x, target=[1, 2])
    assert _state(model) == before


# ----------------------------------------------------------------------------- negative targets


@pytest.mark.parametrize("name", ["agcam"] + list(CASES))
def test_negative_target_is_the_predicted_class(name):
    # One rule with the ONNX graph and the torch-free kit: a negative class means "predicted".
    model = _model("plain")
    x = input_for("plain", batch=3, seed=4)
    with torch.no_grad():
        pred = model(x).argmax(-1)
    make_method = (lambda m: _api("AGCAM")(m)) if name == "agcam" else CASES[name]
    method = make_method(model)
    noise = None
    if name == "cdam_smooth":
        noise = torch.randn(3, 3, _n_tokens(model, "plain"), _dim(model), generator=torch.Generator().manual_seed(2))
    want = _call(name, method, x, [3, int(pred[1]), int(pred[2])], noise)
    _close(_call(name, method, x, [3, -1, -7], noise), want)
    _close(_call(name, method, x, torch.tensor([3, -1, -1]), noise), want)
    np = pytest.importorskip("numpy")
    _close(_call(name, method, x, np.array([3, -2, -1]), noise), want)
    _close(_call(name, method, x, -1, noise), _call(name, method, x, None, noise))
    _close(_call(name, method, x, (-1,), noise), _call(name, method, x, pred, noise))
    with pytest.raises(ValueError, match="out of range"):
        _call(name, method, x, [3, -1, 10], noise)


# ----------------------------------------------------------------------------- pooled heads (no [class] token)


def _pooled(pool):
    """Tiny timm ViTs whose head does not read a [class] token."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    if pool == "avg":  # vit_medium_patch16_gap_256-style
        m = VisionTransformer(**TINY, class_token=False, global_pool="avg", fc_norm=False)
    elif pool == "map":  # SigLIP-style attention-pooling head
        m = VisionTransformer(**TINY, class_token=False, global_pool="map")
    elif pool == "avg_with_cls":  # a [class] token exists, but the head averages the patches
        m = VisionTransformer(**TINY, global_pool="avg")
    else:
        raise KeyError(pool)
    return _perturb(m).eval()


POOLS = ["avg", "map", "avg_with_cls"]


class _CountForwards:
    """Counts the patch embedding's calls: a refusal must come before any compute."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.patch_embed.register_forward_pre_hook(self._hook)

    def _hook(self, _m, _args):
        self.n += 1


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("name", ["agcam", "rollout", "lrp", "gae", "raw"])
def test_class_row_methods_refuse_pooled_heads_and_name_cdam(name, pool):
    from captum_vit.attr import METHODS

    model = _pooled(pool)
    before = _state(model)
    counter = _CountForwards(model)
    try:
        with pytest.raises(ValueError, match=r"(?s)\[class\].*CDAM") as err:
            METHODS[name](model)
    finally:
        counter.handle.remove()
    # the refusal names the explicit option where the method has one, and what works on this model
    assert ("Pass query='pooled'" in str(err.value)) == (name != "lrp")
    assert "CDAM ('cdam')" in str(err.value) and "AGCAM ('agcam', query='pooled')" in str(err.value) or name == "agcam"
    assert counter.n == 0
    assert _state(model) == before


@pytest.mark.parametrize("pool", POOLS)
def test_cdam_on_pooled_heads_against_reference(pool):
    model = _pooled(pool)
    x = input_for("plain", batch=3)
    r = ref.cdam(model, x, TARGETS)
    _signed(r)
    C = _api("CDAM")(model)
    _close(_flat(C.attribute(x, target=TARGETS), "plain"), r)
    # A concept lives in the [class]-embedding space, which these heads do not have: refused before any forward.
    counter = _CountForwards(model)
    try:
        for kw in (dict(concept=torch.ones(_dim(model))), dict(target_fn=lambda e: e.sum(-1))):
            with pytest.raises(ValueError, match=r"\[class\] embedding.*target="):
                C.attribute(x, **kw)
    finally:
        counter.handle.remove()
    assert counter.n == 0


# ----------------------------------------------------------------------------- training mode


def _train_copy(model, **rates):
    m = copy.deepcopy(model).train()
    for mod in m.modules():
        if isinstance(mod, torch.nn.Dropout) and "dropout" in rates:
            mod.p = rates["dropout"]
    return m


@pytest.mark.filterwarnings("ignore:.*training mode")
@pytest.mark.parametrize("arch", ["plain", "layerscale", "hf"])
@pytest.mark.parametrize("name", ["transformer_attribution", "gae", "cdam", "rollout"])
def test_training_mode_without_dropout_equals_eval(name, arch):
    # Every dropout and drop-path rate 0 (timm's and these configs' default): the training-mode
    # forward is the eval forward, so the maps must be the eval maps, LRP included.
    double = name == "transformer_attribution"
    model = _model(arch, double=double)
    x = input_for(arch, batch=3).to(next(model.parameters()).dtype)
    want = CASES[name](model).attribute(x, target=TARGETS)
    trained = _train_copy(model)
    assert trained.training
    got = CASES[name](trained).attribute(x, target=TARGETS)
    _close(got, want)
    assert trained.training and all(m.training for m in trained.modules())


def _randomised(case):
    """Tiny models with one kind of active randomness."""
    from timm.models.vision_transformer import VisionTransformer

    if case in ("plain", "hf"):  # every nn.Dropout at 0.1 (HF: hidden dropout), training mode
        return _train_copy(_model(case), dropout=0.1), case
    if case == "drop_path":  # timm DropPath only
        torch.manual_seed(0)
        return _perturb(VisionTransformer(**TINY, drop_path_rate=0.1)).train(), "plain"
    if case == "one_submodule":  # an eval model with one attention dropout switched to training mode
        m = copy.deepcopy(_model("plain"))
        m.blocks[1].attn.attn_drop.p = 0.2
        m.blocks[1].attn.attn_drop.train()
        return m, "plain"
    raise KeyError(case)


@pytest.mark.parametrize("name", ["transformer_attribution", "cdam"])
@pytest.mark.parametrize("case", ["plain", "hf", "drop_path", "one_submodule"])
def test_pure_forward_methods_refuse_active_dropout_before_any_compute(case, name):
    # LRP's rules and CDAM's re-run of the last block need the pure forward over the parts,
    # which does not reproduce dropout: a map from it would not be the model's.
    model, arch = _randomised(case)
    before = _state(model)
    method = CASES[name](model)
    embed = model.patch_embed if arch != "hf" else model.vit.embeddings
    calls = []
    handle = embed.register_forward_pre_hook(lambda _m, _a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="(?s)dropout.*model.eval()"):
            method.attribute(input_for(arch, batch=2), target=[1, 2])
    finally:
        handle.remove()
    assert not calls
    assert _state(model) == before
