"""Perturbation metrics against per-image numpy references written from the protocol's definitions.

The "model" is a linear map on the flattened image, so every probability is
analytic: softmax(W x + b). References loop over images and fractions, one
numpy forward per perturbed copy, and share no code with the library.
"""

import contextlib
import math

import numpy as np
import pytest
import scipy.ndimage
import torch
from reference_abpc import abpc as reference_abpc

from captum_vit.metrics import abpc, deletion_insertion, gaussian_blur, perturbation_curves

C, H, W = 3, 8, 8
N_CLASSES = 4
FRACTIONS = [i / 10 for i in range(11)]


def _linear_model(seed=0, n_classes=N_CLASSES):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(C * H * W, n_classes).double()
    with torch.no_grad():
        lin.weight.copy_(torch.randn(lin.weight.shape, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(lin.bias.shape, generator=g, dtype=torch.float64))
    return torch.nn.Sequential(torch.nn.Flatten(), lin)


class CountingModel:
    """Wraps a model and records the batch size of every call."""

    def __init__(self, model):
        self.model = model
        self.sizes = []

    def __call__(self, x):
        self.sizes.append(x.shape[0])
        return self.model(x)


def _ref_prob(model, img, label):
    lin = model[1]
    wgt = lin.weight.detach().numpy()
    bias = lin.bias.detach().numpy()
    logits = wgt @ img.reshape(-1) + bias
    e = np.exp(logits - logits.max())
    return (e / e.sum())[label]


def _ref_upsample(m, out_h, out_w):
    """Bilinear, align_corners=False: source coordinate (dst + 0.5) * in / out - 0.5, clamped at 0."""
    in_h, in_w = m.shape

    def axis(n_out, n_in):
        rows = []
        for d in range(n_out):
            src = max((d + 0.5) * n_in / n_out - 0.5, 0.0)
            i0 = min(int(math.floor(src)), n_in - 1)
            i1 = min(i0 + 1, n_in - 1)
            lam = src - i0
            rows.append((i0, i1, lam))
        return rows

    out = np.zeros((out_h, out_w))
    for y, (y0, y1, ly) in enumerate(axis(out_h, in_h)):
        for x, (x0, x1, lx) in enumerate(axis(out_w, in_w)):
            top = (1 - lx) * m[y0, x0] + lx * m[y0, x1]
            bot = (1 - lx) * m[y1, x0] + lx * m[y1, x1]
            out[y, x] = (1 - ly) * top + ly * bot
    return out


def _ref_order(m, most_first):
    """Pixel indices in removal order: min-max on the grid, upsample, round to 1e-9, stable sort (ties: raster)."""
    rng = m.max() - m.min()
    m = (m - m.min()) / rng if rng > 0 else np.zeros_like(m)
    # equal-in-exact-arithmetic pixels tie: scores count in steps of 1e-9
    s = np.round(_ref_upsample(m, H, W).reshape(-1), 9)
    return np.argsort(-s, kind="stable") if most_first else np.argsort(s, kind="stable")


def _ref_curve(model, img, m, label, most_first, fractions=FRACTIONS, value=0.0):
    order = _ref_order(m, most_first)
    out = []
    for s in fractions:
        k = int(H * W * s)
        x = img.copy().reshape(C, H * W)
        vals = np.broadcast_to(np.asarray(value, dtype=np.float64), (C, H, W)).reshape(C, H * W)
        x[:, order[:k]] = vals[:, order[:k]]
        out.append(_ref_prob(model, x, label))
    return np.array(out)


def _data(b=3, seed=1, grid=(4, 4)):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(b, C, H, W, generator=g, dtype=torch.float64)
    maps = torch.rand(b, 1, *grid, generator=g, dtype=torch.float64)
    labels = torch.arange(b) % N_CLASSES
    return images, maps, labels


@pytest.mark.parametrize("order", ["morf", "lerf"])
@pytest.mark.parametrize("grid", [(4, 4), (2, 4), (8, 8)])
def test_curves_match_reference(order, grid):
    model = _linear_model()
    images, maps, labels = _data(grid=grid)
    got = perturbation_curves(model, images, maps, labels, order=order, batch_size=5)
    assert got.shape == (3, 11)
    for b in range(3):
        want = _ref_curve(model, images[b].numpy(), maps[b, 0].numpy(), int(labels[b]), order == "morf")
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10, atol=1e-12)


def test_end_points():
    """0% removed scores the clean image; 100% removed scores the all-`value` image for both orders."""
    model = _linear_model()
    images, maps, labels = _data()
    for order in ("morf", "lerf"):
        got = perturbation_curves(model, images, maps, labels, order=order)
        for b in range(3):
            lab = int(labels[b])
            assert got[b, 0].item() == pytest.approx(_ref_prob(model, images[b].numpy(), lab), rel=1e-12)
            assert got[b, -1].item() == pytest.approx(_ref_prob(model, np.zeros((C, H, W)), lab), rel=1e-12)


def test_value_broadcasts_per_channel():
    model = _linear_model()
    images, maps, labels = _data()
    value = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64).reshape(C, 1, 1)
    got = perturbation_curves(model, images, maps, labels, order="morf", value=value)
    for b in range(3):
        want = _ref_curve(model, images[b].numpy(), maps[b, 0].numpy(), int(labels[b]), True,
                          value=value.numpy())
        np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10, atol=1e-12)


def test_abpc_is_plain_mean_difference():
    model = _linear_model()
    images, maps, labels = _data()
    out = abpc(model, images, maps, labels, batch_size=4)
    for b in range(3):
        args = (model, images[b].numpy(), maps[b, 0].numpy(), int(labels[b]))
        morf, lerf = _ref_curve(*args, True), _ref_curve(*args, False)
        assert out["auc_morf"][b].item() == pytest.approx(morf.sum() / 11, rel=1e-10)
        assert out["auc_lerf"][b].item() == pytest.approx(lerf.sum() / 11, rel=1e-10)
        assert out["abpc"][b].item() == pytest.approx(lerf.sum() / 11 - morf.sum() / 11, rel=1e-9, abs=1e-12)
        np.testing.assert_allclose(out["morf_curve"][b].numpy(), morf, rtol=1e-10)
        np.testing.assert_allclose(out["lerf_curve"][b].numpy(), lerf, rtol=1e-10)


def test_abpc_sign_true_relevance_vs_negation():
    """Two classes, class 1 has zero weights: p0 = sigmoid(sum_p r_p) with r_p = sum_c w_cp x_cp.

    Setting pixel p to 0 removes exactly r_p from the logit, so r is the true
    relevance: MoRF of r removes the positive evidence first (p0 falls), LeRF
    the negative (p0 rises): ABPC(r) > 0, and ABPC(-r) = -ABPC(r).
    """
    model = _linear_model(seed=3, n_classes=2)
    with torch.no_grad():
        model[1].weight[1].zero_()
        model[1].bias.zero_()
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, C, H, W, generator=g, dtype=torch.float64)
    wgt = model[1].weight[0].reshape(C, H, W)
    relevance = (wgt * images).sum(dim=1, keepdim=True)  # [B, 1, H, W], full resolution
    labels = torch.zeros(2, dtype=torch.long)
    pos = abpc(model, images, relevance, labels)["abpc"]
    neg = abpc(model, images, -relevance, labels)["abpc"]
    assert (pos > 0.05).all()
    torch.testing.assert_close(neg, -pos, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 5, 7, 22, 64, 65, 66, 100])
def test_batching_counts_and_invariance(batch_size):
    """18 interior copies + the clean image per image + one baseline per call, in near-equal calls."""
    model = _linear_model()
    images, maps, labels = _data(b=3)
    per_image_value = torch.zeros(3, C, H, W, dtype=torch.float64)
    ref = abpc(model, images, maps, labels, batch_size=1000)
    for kw, n in [({}, 18 * 3 + 3 + 1), ({"logits": ref["logits"]}, 18 * 3 + 1),
                  ({"value": per_image_value}, 18 * 3 + 3 + 3)]:
        counting = CountingModel(model)
        out = abpc(counting, images, maps, labels, batch_size=batch_size, **kw)
        assert sum(counting.sizes) == n, kw
        assert len(counting.sizes) == math.ceil(n / batch_size)
        assert max(counting.sizes) <= batch_size
        assert max(counting.sizes) - min(counting.sizes) <= 1  # no tiny tail call
        for k in ("auc_morf", "auc_lerf", "abpc"):
            torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-15)


def test_constant_map_removes_in_raster_order_and_scores_zero():
    model = _linear_model()
    images, _, labels = _data()
    maps = torch.full((3, 1, 4, 4), 0.7, dtype=torch.float64)
    out = abpc(model, images, maps, labels)
    assert not torch.isnan(out["abpc"]).any()
    torch.testing.assert_close(out["morf_curve"], out["lerf_curve"], rtol=0, atol=0)
    assert (out["abpc"] == 0).all()
    for b in range(3):
        x0 = images[b].numpy().reshape(C, H * W)
        want = []
        for s in FRACTIONS:
            x = x0.copy()
            x[:, : int(H * W * s)] = 0.0  # raster order
            want.append(_ref_prob(model, x, int(labels[b])))
        np.testing.assert_allclose(out["morf_curve"][b].numpy(), want, rtol=1e-10)


def test_ties_keep_raster_order_both_ways():
    model = _linear_model()
    images, _, labels = _data()
    g = torch.Generator().manual_seed(7)
    maps = torch.randint(0, 3, (3, 1, H, W), generator=g).double()  # many exact ties
    for order in ("morf", "lerf"):
        got = perturbation_curves(model, images, maps, labels, order=order)
        for b in range(3):
            want = _ref_curve(model, images[b].numpy(), maps[b, 0].numpy(), int(labels[b]), order == "morf")
            np.testing.assert_allclose(got[b].numpy(), want, rtol=1e-10)


def test_float32_inputs_and_int_label():
    model = _linear_model().float()
    images, maps, _ = _data()
    out = abpc(model, images.float(), maps.float(), 2)
    assert out["abpc"].shape == (3,) and out["abpc"].dtype == torch.float64


def test_argument_errors():
    model = _linear_model()
    images, maps, labels = _data()
    with pytest.raises(ValueError):
        perturbation_curves(model, images, maps, labels, order="random")
    with pytest.raises(ValueError):
        abpc(model, images, maps, labels[:2])
    with pytest.raises(ValueError):
        abpc(model, images, maps[:2], labels)
    with pytest.raises(ValueError):
        perturbation_curves(model, images, maps, labels, fractions=(0.0, 1.5))
    for bad in (torch.zeros(2, N_CLASSES), torch.zeros(3)):
        with pytest.raises(ValueError, match=r"\[3, classes\]"):
            abpc(model, images, maps, labels, logits=bad)
    with pytest.raises(ValueError):
        deletion_insertion(model, images, maps, labels, baseline="black")  # mean/std missing
    with pytest.raises(ValueError):
        deletion_insertion(model, images, maps, labels, baseline="noise")


# --- deletion / insertion -------------------------------------------------------------------


def _ref_blur(img, sigma):
    # scipy's radius is int(truncate * sigma + 0.5); with truncate=3 this equals ceil(3 sigma) for these sigmas
    return np.stack([scipy.ndimage.gaussian_filter(ch, sigma, mode="nearest", truncate=3.0) for ch in img])


def _ref_baseline(img, kind, mean, std, sigma):
    if kind == "grey":
        return np.zeros_like(img)
    if kind == "black":
        return np.broadcast_to(((0.0 - np.asarray(mean)) / np.asarray(std))[:, None, None], img.shape).copy()
    return _ref_blur(img, sigma)


def _ref_del_ins(model, img, m, label, steps, base):
    order = _ref_order(m, True)
    dele, ins = [], []
    for i in range(steps + 1):
        k = int(H * W * i / steps)
        idx = order[:k]
        x = img.copy().reshape(C, -1)
        x[:, idx] = base.reshape(C, -1)[:, idx]
        dele.append(_ref_prob(model, x, label))
        y = base.copy().reshape(C, -1)
        y[:, idx] = img.reshape(C, -1)[:, idx]
        ins.append(_ref_prob(model, y, label))
    dele, ins = np.array(dele), np.array(ins)
    # trapezoidal rule on a uniform grid of spacing 1 / steps over [0, 1]
    area = lambda c: sum((c[i] + c[i + 1]) / 2 * (1 / steps) for i in range(steps))  # noqa: E731
    return dele, ins, area(dele), area(ins)


@pytest.mark.parametrize("kind", ["black", "grey", "blur"])
@pytest.mark.parametrize("steps", [4, 7])
def test_deletion_insertion_match_reference(kind, steps):
    model = _linear_model()
    images, maps, labels = _data()
    mean, std, sigma = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 1.0
    counting = CountingModel(model)
    out = deletion_insertion(counting, images, maps, labels, steps=steps, baseline=kind, mean=mean, std=std,
                             sigma=sigma, batch_size=8)
    assert sum(counting.sizes) == 2 * (steps + 1) * 3
    assert len(counting.sizes) == math.ceil(2 * (steps + 1) * 3 / 8)
    for b in range(3):
        img = images[b].numpy()
        base = _ref_baseline(img, kind, mean, std, sigma)
        dele, ins, a_del, a_ins = _ref_del_ins(model, img, maps[b, 0].numpy(), int(labels[b]), steps, base)
        np.testing.assert_allclose(out["deletion_curve"][b].numpy(), dele, rtol=1e-9)
        np.testing.assert_allclose(out["insertion_curve"][b].numpy(), ins, rtol=1e-9)
        assert out["deletion"][b].item() == pytest.approx(a_del, rel=1e-9)
        assert out["insertion"][b].item() == pytest.approx(a_ins, rel=1e-9)
        # the two curves run between the same two images, in opposite directions
        assert dele[0] == pytest.approx(ins[-1]) and dele[-1] == pytest.approx(ins[0])


@pytest.mark.parametrize("sigma", [1.0, 1.5, 2.0])
def test_gaussian_blur_matches_scipy(sigma):
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, C, 9, 11, generator=g, dtype=torch.float64)
    got = gaussian_blur(images, sigma)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), _ref_blur(images[b].numpy(), sigma), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gaussian_blur(images, 0.0), images)


# ------------------------------------------------------------------ ABPC against the 22-copy reference, bit for bit

REFERENCE_FRACTIONS = [
    FRACTIONS,
    [0.3, 0.0, 0.7],  # any order
    [0.5],  # neither end point
    [1.0, 0.0, 0.5, 0.5, 0.0, 1.0],  # repeats
    [0.11, 0.12, 0.0],  # two fractions, one count (int(64 * s) = 7)
    [0.0],
    [1.0],
]


def _rowwise(model):
    """``model`` on each row alone: a row's logits cannot depend on the rest of the call."""
    return lambda x: torch.cat([model(x[i:i + 1]) for i in range(x.shape[0])])


def _assert_equal_to_reference(got, want):
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), (k, (got[k] - v).abs().max().item())


@pytest.mark.parametrize("fractions", REFERENCE_FRACTIONS, ids=lambda f: ",".join(map(str, f)))
@pytest.mark.parametrize("value", ["zero", "scalar", "per_channel", "per_image"])
def test_abpc_equals_the_22_copy_reference(fractions, value):
    model = _linear_model()
    images, maps, labels = _data(b=3)
    g = torch.Generator().manual_seed(5)
    value = {"zero": 0.0, "scalar": -1.5,
             "per_channel": torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64).reshape(C, 1, 1),
             "per_image": torch.randn(3, C, H, W, generator=g, dtype=torch.float64)}[value]
    fn = _rowwise(model)
    clean = fn(images).detach()
    for batch_size in (1, 5, 7, 64, 1000):
        want = reference_abpc(fn, images, maps, labels, fractions=fractions, value=value, batch_size=batch_size)
        got = abpc(fn, images, maps, labels, fractions=fractions, value=value, batch_size=batch_size)
        _assert_equal_to_reference(got, want)
        assert torch.equal(got["logits"], clean)
        given = abpc(fn, images, maps, labels, fractions=fractions, value=value, batch_size=batch_size,
                     logits=clean)
        _assert_equal_to_reference(given, want)
        assert given["logits"] is clean


@contextlib.contextmanager
def two_threads():
    """torch on two intra-op threads inside the block, restored after (as ``helpers.one_thread``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _vit_equals_reference(model, images, maps, labels):
    """At batch_size=64 every call of either algorithm has 16+ rows: a ViT scores each row the same bits."""
    def fn(x):
        with torch.no_grad():
            return model(x)

    with two_threads():
        want = reference_abpc(fn, images, maps, labels, batch_size=64)
        got = abpc(fn, images, maps, labels, batch_size=64)
        _assert_equal_to_reference(got, want)
        _assert_equal_to_reference(abpc(fn, images, maps, labels, batch_size=64, logits=got["logits"]), want)


def test_abpc_equals_the_reference_on_a_vit():
    from helpers import make_timm

    g = torch.Generator().manual_seed(0)
    images = torch.randn(8, 3, 64, 64, generator=g)
    maps = torch.rand(8, 1, 8, 8, generator=g)
    _vit_equals_reference(make_timm("plain"), images, maps, torch.arange(8) % 10)


@pytest.mark.slow
def test_abpc_equals_the_reference_on_the_shipped_model():
    from captum_vit.data import ShapesDataset
    from captum_vit.models import load_model

    model, cfg, _ = load_model("shapes_vit")
    ds = ShapesDataset("single", seed=2024, size=16, image_size=int(cfg["input_size"][-1]), mean=cfg["mean"],
                       std=cfg["std"])
    images = torch.stack([ds[i]["image"] for i in range(16)])
    labels = torch.tensor([int(ds[i]["label"]) for i in range(16)])
    maps = torch.rand(16, 1, 14, 14, generator=torch.Generator().manual_seed(0))
    _vit_equals_reference(model, images, maps, labels)
