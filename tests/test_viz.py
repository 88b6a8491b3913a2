"""Overlays, the gallery figure and the bridge to captum.attr.visualization."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from captum_vit.viz import colorize, gallery, overlay, save_overlay, to_captum_hwc


def _image(h=32, w=48, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_overlay_blends_the_upsampled_minmax_map():
    img = _image()
    cam = torch.zeros(4, 6)
    cam[0, 0] = 5.0  # hot top-left patch
    out = overlay(img, cam, alpha=0.5, cmap="jet")
    assert out.dtype == np.uint8 and out.shape == img.shape
    # independent reference: alpha=0 is the image, alpha=1 is the colour map
    assert np.array_equal(overlay(img, cam, alpha=0.0), img)
    heat = overlay(img, cam, alpha=1.0)
    jet = matplotlib.colormaps["jet"]
    hot = np.rint(np.array(jet(1.0)[:3]) * 255)
    cold = np.rint(np.array(jet(0.0)[:3]) * 255)
    assert np.array_equal(heat[0, 0], hot)      # the map's maximum (corner, clamped) -> top colour
    assert np.array_equal(heat[-1, -1], cold)   # far away from it -> bottom colour
    np.testing.assert_allclose(out.astype(float), 0.5 * img + 0.5 * heat.astype(float), atol=1.0)
    # tensor shapes [1, h, w] / [1, 1, h, w], and a constant map gives no NaN
    assert np.array_equal(overlay(torch.from_numpy(img), cam[None, None]), out)
    assert np.array_equal(overlay(img, torch.ones(4, 6), alpha=1.0)[5, 5], cold)


def test_colorize_range():
    rgb = colorize(np.linspace(-1, 2, 10).reshape(2, 5))
    assert rgb.shape == (2, 5, 3) and rgb.min() >= 0 and rgb.max() <= 1


def test_save_overlay(tmp_path):
    p = tmp_path / "sub" / "cam.png"
    out = save_overlay(str(p), _image(), torch.rand(2, 3))
    assert np.array_equal(np.asarray(Image.open(p).convert("RGB")), out)


def test_gallery_writes_png(tmp_path):
    images = [_image(seed=i) for i in range(3)]
    gt = [torch.tensor([[2, 3, 20, 25]]), torch.tensor([[0, 0, 10, 10], [30, 5, 40, 20]]),
          torch.zeros(0, 4, dtype=torch.int64)]
    maps = {"agcam": torch.rand(3, 1, 4, 6), "other": [torch.rand(4, 6) for _ in range(3)]}
    p = gallery(str(tmp_path / "g.png"), images, gt, maps, titles=["a", "b", "c"])
    with Image.open(p) as im:
        assert im.format == "PNG"
        assert im.size == (3 * 220, 3 * 220 + 30)  # 3 columns x 3 rows of 2.2 in at 100 dpi, + title room
    # explicit predicted boxes, a stacked image tensor, a single image row
    p2 = gallery(str(tmp_path / "g2.png"), torch.from_numpy(np.stack(images[:1])), None,
                 {"agcam": maps["agcam"][:1]}, pred_boxes_by_method={"agcam": [torch.tensor([[1, 1, 5, 5]])]})
    with Image.open(p2) as im:
        assert im.size[0] > 0
    with pytest.raises(ValueError):
        gallery(str(tmp_path / "bad.png"), images, gt, {"agcam": torch.rand(2, 1, 4, 6)})


def test_gallery_draws_boxes_in_the_right_colours(tmp_path):
    img = np.full((64, 64, 3), 128, np.uint8)
    gt = [torch.tensor([[10, 10, 40, 40]])]
    p = gallery(str(tmp_path / "c.png"), [img], gt, {"m": torch.zeros(1, 1, 2, 2)},
                pred_boxes_by_method={"m": [torch.tensor([[10, 10, 40, 40]])]}, cell_inches=3, dpi=100)
    arr = np.asarray(Image.open(p).convert("RGB")).astype(int)
    left, right = arr[:, : arr.shape[1] // 2], arr[:, arr.shape[1] // 2:]
    green = (left[..., 1] > 200) & (left[..., 0] < 80) & (left[..., 2] < 80)
    red = (right[..., 0] > 200) & (right[..., 1] < 80) & (right[..., 2] < 80)
    assert green.sum() > 50 and red.sum() > 50


def test_to_captum_hwc_feeds_visualize_image_attr():
    from captum.attr import visualization as cviz

    g = torch.Generator().manual_seed(0)
    attr = torch.rand(2, 1, 14, 14, generator=g)
    hwc = to_captum_hwc(attr, size=(224, 224))
    assert len(hwc) == 2 and hwc[0].shape == (224, 224, 1)
    ref = torch.nn.functional.interpolate(attr, size=(224, 224), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(hwc[1][..., 0], ref[1, 0].numpy())
    img = _image(224, 224)
    fig, ax = cviz.visualize_image_attr(hwc[0], img, method="blended_heat_map", sign="positive",
                                        use_pyplot=False)
    assert fig is not None and ax is not None
    # signed maps (e.g. CDAM) keep their sign and use sign="all"
    signed = to_captum_hwc(attr - 0.5)
    assert signed[0].shape == (14, 14, 1) and signed[0].min() < 0 < signed[0].max()
    fig, _ = cviz.visualize_image_attr(signed[0], None, method="heat_map", sign="all", use_pyplot=False)
    fig, _ = cviz.visualize_image_attr(to_captum_hwc(attr - 0.5, (224, 224))[0], img,
                                       method="blended_heat_map", sign="all", use_pyplot=False)
    assert fig is not None
    with pytest.raises(ValueError):
        to_captum_hwc(torch.rand(2, 3, 4, 4))
