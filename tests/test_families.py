"""Every ViT family against the independent references of tests/reference_families.py.

For each family (tiny random-init configs from tests/helpers.py) and each method defined on it:
the batched attribution equals the reference (the model's own forward, unfused, autograd, one
image at a time) within 1e-5 x max|ref|; one image at a time equals the batch; AGCAM's one-token
engine equals the generic one; ONNX Runtime equals eager where the model exports; methods that
are not defined refuse before any compute, naming what works, and leave the model as it was.
"""

import numpy as np
import pytest
import torch

import reference_attnlrp
import reference_families as ref
from helpers import _state, family_input, make_family, one_thread

TARGETS = [1, 4, 7]

#: family -> the query rows the methods read on it (``"class"``: a [class]-token head).
FAMILY_QUERY = {
    "beit_cls": "class",
    "beit_avg": "pooled",
    "relpos_cls": "class",
    "relpos_avg": "pooled",
    "relpos_shared": "class",
    "vit_gap": "pooled",
    "vit_map": "pooled",
    "hf_deit": "class",
    "hf_deit_teacher": "class",
    "hf_dinov2": "pooled",
    "hf_dinov2_swiglu": "pooled",
    "hf_dinov2_registers": "pooled",
    "eva_cls": "class",
    "eva_packed": "class",
    "eva02_avg": "pooled",
    "pe_core_map": "pooled",
    "naflex": "pooled",
    "naflex_cls": "class",
}

#: family -> methods that refuse it (with the reason the message must contain).
REFUSED = {
    "beit_cls": {"lrp": "relative-position bias"},
    "beit_avg": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "relpos_cls": {"lrp": "relative-position bias"},
    "relpos_avg": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "relpos_shared": {"lrp": "relative-position bias"},
    "vit_gap": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "vit_map": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "hf_deit_teacher": {"lrp": "averages several heads"},
    "hf_dinov2": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "hf_dinov2_swiglu": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "hf_dinov2_registers": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "eva_cls": {"lrp": "rotary"},
    "eva_packed": {"lrp": "rotary"},
    "eva02_avg": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "pe_core_map": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
    "naflex": {"lrp": "[class] token", "attnlrp": "pools the tokens"},
}

#: families whose [class]-token AGCAM runs the one-token engine and exports to ONNX.
ONE_TOKEN = ["hf_deit", "hf_deit_teacher", "eva_cls", "eva_packed", "beit_cls", "relpos_cls", "relpos_shared",
             "naflex_cls"]

FAMILIES = sorted(FAMILY_QUERY)

_REFERENCES = {
    "agcam": ref.agcam_batched,
    "rollout": ref.rollout_batched,
    "raw": ref.raw_attention_batched,
    "gae": ref.gae_batched,
    "cdam": ref.cdam_batched,
    "attnlrp": reference_attnlrp.attnlrp_batched,
}


def _method(name, model, query, **kw):
    from captum_vit.attr import METHODS

    cls = METHODS[name]
    if name in ("agcam", "rollout", "raw", "gae"):
        kw["query"] = query
    return cls(model, **kw)


def _flat(cam):
    return cam.reshape(cam.shape[0], -1)


def _close(a, b, rel=1e-5):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(b.abs().max())
    assert scale > 0, "the reference map is all zero: the comparison would prove nothing"
    err = float((a - b).abs().max())
    assert err <= rel * scale, f"max |diff| {err:.3g} > {rel:g} x max|ref| {scale:.3g}"


def _cases():
    for fam in FAMILIES:
        for name in _REFERENCES:
            if name not in REFUSED.get(fam, {}):
                yield fam, name


@pytest.mark.parametrize("family,name", list(_cases()))
def test_method_equals_the_independent_reference(family, name):
    model = make_family(family)
    query = FAMILY_QUERY[family]
    x = family_input(family, batch=3)
    with one_thread():
        before = _state(model)
        got = _flat(_method(name, model, query).attribute(x, target=TARGETS))
        kw = {"query": query} if name not in ("cdam", "attnlrp") else {}
        want = _REFERENCES[name](model, x, TARGETS, **kw)
        _close(got, want)
        # one image at a time equals the batch
        single = torch.cat([_flat(_method(name, model, query).attribute(x[i : i + 1], target=TARGETS[i]))
                            for i in range(3)])
        _close(single, got)
    assert _state(model) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_the_models_own(family):
    from captum_vit.vit import adapt

    model = make_family(family)
    x = family_input(family, batch=2)
    with one_thread(), torch.no_grad():
        _close(adapt(model).logits(x), ref.logits_batched(model, x))


@pytest.mark.parametrize("family,name", [(f, n) for f in FAMILIES for n in REFUSED.get(f, {})])
def test_methods_not_defined_refuse_naming_what_works(family, name):
    from captum_vit.attr import METHODS

    model = make_family(family)
    before = _state(model)
    with pytest.raises(ValueError) as err:
        _method(name, model, FAMILY_QUERY[family])
    msg = str(err.value)
    assert REFUSED[family][name] in msg
    assert "On this model these work:" in msg and "CDAM ('cdam')" in msg
    # every method the message names as working does construct
    for other, cls in METHODS.items():
        if f"('{other}'" in msg:
            cls(model, **({"query": "pooled"} if f"('{other}', query='pooled')" in msg else {}))
    assert _state(model) == before


@pytest.mark.parametrize("family", [f for f in FAMILIES if FAMILY_QUERY[f] == "pooled"])
@pytest.mark.parametrize("name", ["agcam", "rollout", "raw", "gae"])
def test_pooled_models_need_the_explicit_option(family, name):
    """``query="class"`` (the default) is refused on a pooled head; the message names ``query='pooled'``."""
    model = make_family(family)
    with pytest.raises(ValueError, match=r"Pass query='pooled'"):
        _method(name, model, "class")


@pytest.mark.parametrize("family", ONE_TOKEN)
def test_one_token_engine_equals_generic(family):
    from captum_vit import AGCAM

    model = make_family(family)
    x = family_input(family, batch=3)
    with one_thread():
        one = AGCAM(model, engine="one_token")
        assert one.resolved_engine() == "one_token"
        with torch.inference_mode():  # the one-token engine needs no autograd
            a = one.attribute(x, target=TARGETS)
        b = AGCAM(model, engine="generic").attribute(x, target=TARGETS)
    _close(_flat(a), _flat(b))


@pytest.mark.parametrize("family", ONE_TOKEN)
def test_onnx_runtime_equals_eager(family, tmp_path):
    import onnxruntime as ort

    from captum_vit import AGCAM
    from captum_vit.onnx import export_onnx

    model = make_family(family)
    x = family_input(family, batch=3)
    cfg = {"input_size": tuple(x.shape[1:]), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "squash"}
    with one_thread():
        path = export_onnx(model, str(tmp_path / "m.onnx"), data_config=cfg)
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        logits, cam = session.run(None, {"image": x.numpy(), "target": np.asarray(TARGETS, dtype=np.int64)})
        eager, eager_logits = AGCAM(model).attribute(x, target=TARGETS, return_logits=True)
    _close(torch.from_numpy(logits), eager_logits, rel=1e-4)
    _close(torch.from_numpy(cam).flatten(1), _flat(eager), rel=1e-4)


def test_evaluate_and_explain_take_the_pooled_query(tmp_path):
    """``--query pooled`` reaches the methods that read query rows; the default refuses a pooled ViT."""
    from captum_vit.attr import construct
    from captum_vit.data import ShapesDataset
    from captum_vit.evaluation import evaluate

    model = make_family("vit_gap")
    with pytest.raises(ValueError, match="query='pooled'"):
        evaluate(model, ShapesDataset("single", seed=1, size=2, image_size=64), "agcam", progress=False)
    with pytest.raises(ValueError, match="query must be one of"):
        construct(__import__("captum_vit").CDAM, model, "rows")
    ds = ShapesDataset("single", seed=1, size=2, image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3)
    with one_thread():
        r = evaluate(model, ds, "agcam,rollout,cdam", query="pooled", progress=False, metrics="localization")
    assert r["n_computed"] == 2 and r["fingerprint"]["query"] == "pooled"
    # and the command line: explain takes --query too
    from PIL import Image

    from captum_vit.cli import explain

    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(ValueError, match="query='pooled'"):
        explain([str(tmp_path / "grey.png")], "vit_medium_patch16_gap_256", out=str(tmp_path / "o"), method="rollout")
