"""Overlays, the gallery figure and the bridge to captum.attr.visualization."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from PIL import Image

from captum_vit.viz import (
    _cam_to_size,
    colorize,
    denormalise,
    gallery,
    overlay,
    overlay_stems,
    save_overlay,
    to_captum_hwc,
)


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


def test_cam_to_size_is_the_protocols_upsample_then_minmax():
    # the inline computation _cam_to_size used before it called the localization protocol's functions
    def inline(cam, size):
        t = torch.as_tensor(np.asarray(cam)).float().squeeze()
        t = torch.nn.functional.interpolate(t[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        lo, hi = t.min(), t.max()
        return ((t - lo) / (hi - lo).clamp_min(1e-12)).numpy()

    rng = np.random.default_rng(3)
    for cam, size in [(rng.normal(size=(4, 6)), (32, 48)), (rng.random((1, 7, 5)).astype(np.float32), (30, 17)),
                      (np.ones((1, 1, 3, 3)), (9, 9)), (rng.integers(0, 9, (5, 5)), (5, 5))]:
        got = _cam_to_size(cam, size)
        assert got.dtype == np.float32 and got.shape == size
        assert np.array_equal(got, inline(cam, size))
    with pytest.raises(ValueError, match="2-D map"):
        _cam_to_size(np.zeros((2, 3, 3)), (4, 4))


def test_denormalise_inverts_the_normalisation_to_uint8_hwc():
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    img = _image(7, 9, seed=4)
    x = (torch.from_numpy(img).permute(2, 0, 1).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(
        std).view(3, 1, 1)
    out = denormalise(x, mean, std)
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    assert np.array_equal(out, img)
    # clipped to [0, 1] before the scaling; a data config's lists work as well as tuples; numpy in as well
    y = torch.tensor([[[-9.0, 9.0]]]).expand(3, 1, 2)
    assert denormalise(y, [0.5] * 3, [0.5] * 3).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    assert np.array_equal(denormalise(x.numpy(), list(mean), list(std)), img)
    # the two copies it replaces (command line: from a data config; report: mean and std) give the same bytes
    z = torch.randn(3, 11, 13, generator=torch.Generator().manual_seed(0)) * 3
    cfg = {"mean": mean, "std": std}
    cli = ((z.cpu() * torch.tensor(cfg["std"]).view(3, 1, 1) + torch.tensor(cfg["mean"]).view(3, 1, 1)).clamp(0, 1)
           * 255).round().byte().permute(1, 2, 0).numpy()
    report = ((z.float() * torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
               + torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)).clamp(0, 1) * 255).round().byte().permute(
        1, 2, 0).numpy()
    assert np.array_equal(denormalise(z, cfg["mean"], cfg["std"]), cli)
    assert np.array_equal(denormalise(z, mean, std), report)


def test_overlay_stems_are_distinct_case_insensitively_and_in_order():
    assert overlay_stems(["a/img.png", "b/img.png", "img_2.png", "c/IMG.jpg", "d/other.png"]) == [
        "img", "img_2", "img_2_2", "IMG_3", "other"]
    assert overlay_stems(["a/cat.png", "b/cat.png", "cat.jpg", "img_2.png"]) == ["cat", "cat_2", "cat_3", "img_2"]
    assert overlay_stems(["a/cat.png", "cat_2.png", "b/cat.png", "Cat.JPG"]) == ["cat", "cat_2", "cat_3", "Cat_4"]
    assert overlay_stems([]) == []
