"""Localization metrics against hand-computed numbers and independent references of the protocol."""

import numpy as np
import pytest
import torch

from captum_vit.metrics import (
    METRIC_NAMES,
    binarize,
    boxes_to_mask,
    boxes_touch_instances,
    contour_boxes,
    evaluate_localization,
    instances_touched,
    localization_metrics,
    mass_inside,
    mean,
    minmax_normalize,
    predict_boxes,
    scale_boxes,
    upsample,
)

EPS = 1e-5


def _formulas(tp, fp, fn, tn, eps=EPS):
    """The five metrics written straight from their definitions (TP, FP, FN, TN pixel counts, eps = 1e-5)."""
    return {
        "pixel_accuracy": (tp + tn + eps) / (tp + tn + fp + fn + eps),
        "iou": (tp + eps) / (tp + fp + fn + eps),
        "dice": (2 * tp + eps) / (2 * tp + fp + fn + eps),
        "precision": (tp + eps) / (tp + fp + eps),
        "recall": (tp + eps) / (tp + fn + eps),
    }


def _assert_metrics(got, want, index=0):
    assert set(got) == set(METRIC_NAMES)
    for k in METRIC_NAMES:
        assert float(got[k][index]) == pytest.approx(want[k], rel=1e-12, abs=1e-12), k


# ------------------------------------------------------------------------------------------------
# normalisation, resizing, thresholding
# ------------------------------------------------------------------------------------------------
def test_minmax_per_image_and_constant_maps():
    maps = torch.tensor([[[[2.0, 4.0], [6.0, 10.0]]], [[[3.0, 3.0], [3.0, 3.0]]], [[[-1.0, 0.0], [0.0, 1.0]]]])
    out = minmax_normalize(maps)
    assert out.shape == maps.shape
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))
    assert torch.equal(out[1], torch.zeros(1, 2, 2))  # constant: zeros, no NaN
    torch.testing.assert_close(out[2, 0], torch.tensor([[0.0, 0.5], [0.5, 1.0]]))


def test_upsample_matches_cv2_half_pixel_bilinear():
    import cv2

    g = torch.Generator().manual_seed(0)
    maps = torch.rand(3, 1, 14, 14, generator=g)
    up = upsample(maps, 224)
    assert up.shape == (3, 1, 224, 224)
    for i in range(3):
        ref = cv2.resize(maps[i, 0].numpy(), (224, 224), interpolation=cv2.INTER_LINEAR)
        np.testing.assert_allclose(up[i, 0].numpy(), ref, atol=1e-5)
    assert upsample(maps[:, 0], (28, 42)).shape == (3, 1, 28, 42)


def test_binarize_is_strict():
    m = torch.tensor([0.49, 0.5, 0.51, 1.0])
    assert binarize(m).tolist() == [False, False, True, True]
    assert binarize(m, threshold=0.49).tolist() == [False, True, True, True]


# ------------------------------------------------------------------------------------------------
# boxes
# ------------------------------------------------------------------------------------------------
def test_contour_boxes_hand_example():
    m = torch.zeros(6, 8, dtype=torch.bool)
    m[0:3, 0:2] = True          # 2 wide, 3 tall at the corner -> (0, 0, 2, 3)
    m[4, 4] = m[5, 5] = True    # diagonal neighbours: one 8-connected blob -> (4, 4, 6, 6)
    m[4, 7] = True              # single pixel at the border -> (7, 4, 8, 5)
    boxes = contour_boxes(m)
    assert boxes.dtype == torch.int64 and boxes.shape == (3, 4)
    assert sorted(map(tuple, boxes.tolist())) == [(0, 0, 2, 3), (4, 4, 6, 6), (7, 4, 8, 5)]
    # numpy input and an empty mask
    assert contour_boxes(m.numpy()).shape == (3, 4)
    assert contour_boxes(torch.zeros(5, 5, dtype=torch.bool)).shape == (0, 4)


def test_a_ring_gives_one_external_box():
    # a hollow square: its hole has a contour of its own, but only external contours give boxes
    m = torch.zeros(12, 12, dtype=torch.bool)
    m[2:9, 3:10] = True
    m[4:7, 5:8] = False
    assert contour_boxes(m).tolist() == [[3, 2, 10, 9]]
    # and the constant map (min-max gives zeros): nothing above the threshold, no box
    assert contour_boxes(torch.zeros(12, 12, dtype=torch.bool)).tolist() == []


def test_contour_box_mask_is_one_pixel_larger_than_the_blob():
    m = torch.zeros(10, 10, dtype=torch.bool)
    m[2:5, 3:7] = True  # rows 2..4, cols 3..6: 12 px
    boxes = contour_boxes(m)
    assert boxes.tolist() == [[3, 2, 7, 5]]
    filled = boxes_to_mask(boxes, 10)
    expected = torch.zeros(10, 10, dtype=torch.bool)
    expected[2:6, 3:8] = True  # one more row and column than the blob
    assert torch.equal(filled, expected)
    assert int(filled.sum()) == 20


def test_boxes_to_mask_inclusive_union_and_clipping():
    mask = boxes_to_mask(torch.tensor([[0, 0, 1, 1], [1, 1, 2, 3], [3, 3, 4, 4]]), (4, 5))
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 1, 1, 0, 0],
        [0, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(mask, expected)
    assert not boxes_to_mask(torch.zeros(0, 4, dtype=torch.int64), 7).any()
    assert boxes_to_mask([[0, 0, 9, 9]], 4).all()  # beyond the image: clipped


def test_scale_boxes_truncates_like_python_int():
    assert scale_boxes([[100, 50, 499, 374]], orig_size=(375, 500)).tolist() == [[44, 29, 223, 223]]
    rng = np.random.default_rng(1)
    H, W = 333, 517
    b = rng.integers(0, [W, H, W, H], size=(50, 4))
    ref = [[int(v / (W if k % 2 == 0 else H) * 224) for k, v in enumerate(row)] for row in b.tolist()]
    assert scale_boxes(torch.from_numpy(b), (H, W)).tolist() == ref
    assert scale_boxes([[10, 20, 30, 40]], 100, size=(50, 200)).tolist() == [[20, 10, 60, 20]]


def _blob_masks(n, size, seed):
    """Random binary masks with many blobs, holes, nested blobs and border contact."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        noise = ndimage.gaussian_filter(rng.normal(size=(size, size)), sigma=float(rng.uniform(1.0, 4.0)))
        out.append(noise > np.quantile(noise, float(rng.uniform(0.5, 0.9))))
    return out


def _scipy_box_mask(m):
    """Reference: 8-connected components' bounding boxes, +1 px as the protocol's boundingRect fill."""
    from scipy import ndimage

    lab, _ = ndimage.label(m, structure=np.ones((3, 3), int))
    ref = np.zeros(m.shape, bool)
    for sl in ndimage.find_objects(lab):
        y0, y1 = sl[0].start, sl[0].stop  # stop is exclusive = y + h
        x0, x1 = sl[1].start, sl[1].stop
        ref[y0:y1 + 1, x0:x1 + 1] = True
    return ref


def test_contour_box_mask_matches_scipy_components():
    for m in _blob_masks(25, 64, seed=0):
        got = boxes_to_mask(contour_boxes(torch.from_numpy(m)), m.shape).numpy()
        np.testing.assert_array_equal(got, _scipy_box_mask(m))


# ------------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------------
def test_metrics_hand_example():
    pred = torch.zeros(4, 4, dtype=torch.bool)
    gt = torch.zeros(4, 4, dtype=torch.bool)
    pred[0, 0:3] = pred[1, 0:3] = True  # 6 px
    gt[1:3, 1:3] = True                 # 4 px, overlap (1,1),(1,2)
    got = localization_metrics(pred, gt)
    # TP=2 FP=4 FN=2 TN=8
    _assert_metrics(got, {
        "pixel_accuracy": (10 + EPS) / (16 + EPS),
        "iou": (2 + EPS) / (8 + EPS),
        "dice": (4 + EPS) / (10 + EPS),
        "precision": (2 + EPS) / (6 + EPS),
        "recall": (2 + EPS) / (4 + EPS),
    })


def test_metrics_edge_cases():
    gt = torch.zeros(10, 10, dtype=torch.bool)
    gt[2:6, 2:7] = True  # 20 px
    empty = torch.zeros_like(gt)
    full = torch.ones_like(gt)
    got = localization_metrics(torch.stack([empty, full, gt, empty]), torch.stack([gt, gt, gt, empty]))
    _assert_metrics(got, _formulas(tp=0, fp=0, fn=20, tn=80), 0)    # empty prediction
    assert float(got["precision"][0]) == pytest.approx(1.0)          # eps / eps
    assert float(got["iou"][0]) < 1e-6
    _assert_metrics(got, _formulas(tp=20, fp=80, fn=0, tn=0), 1)    # full prediction
    assert float(got["recall"][1]) == pytest.approx(1.0)
    assert float(got["pixel_accuracy"][1]) == pytest.approx(0.2, abs=1e-6)
    _assert_metrics(got, _formulas(tp=20, fp=0, fn=0, tn=80), 2)    # perfect
    _assert_metrics(got, _formulas(tp=0, fp=0, fn=0, tn=100), 3)    # nothing anywhere: all 1
    for k in METRIC_NAMES:
        assert float(got[k][3]) == pytest.approx(1.0)


def test_metrics_match_formulas_on_random_masks():
    g = torch.Generator().manual_seed(3)
    pred = torch.rand(5, 1, 9, 11, generator=g) > 0.6
    gt = torch.rand(5, 1, 9, 11, generator=g) > 0.3
    got = localization_metrics(pred, gt)
    for i in range(5):
        p, t = pred[i].numpy().ravel(), gt[i].numpy().ravel()
        tp, fp = int((p & t).sum()), int((p & ~t).sum())
        fn, tn = int((~p & t).sum()), int((~p & ~t).sum())
        _assert_metrics(got, _formulas(tp, fp, fn, tn), i)


def test_evaluate_localization_hand_example():
    # 2x2 map with one hot cell, upsampled x4 (half-pixel bilinear): along each axis the profile is
    # [1, 1, .875, .625, .375, .125, 0, 0]; the product is > 0.5 on rows/cols 0..3 except (3, 3).
    # That blob's boundingRect is (0, 0, 4, 4) -> filled 5 x 5 = 25 px (1 px larger than the blob).
    maps = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]) * 7.0 + 3.0  # scale/offset do not matter
    gt = [torch.tensor([[0, 0, 3, 3]])]  # 16 px, inside the prediction
    metrics, boxes = evaluate_localization(maps, gt, threshold=0.5, size=8, return_boxes=True)
    assert boxes[0].tolist() == [[0, 0, 4, 4]]
    _assert_metrics(metrics, _formulas(tp=16, fp=9, fn=0, tn=39))
    assert float(metrics["iou"][0]) == pytest.approx(0.64, abs=1e-6)


def _reference_pipeline(map_2d, gt_boxes, threshold, size):
    """numpy/cv2/scipy version of the protocol, sharing no code with the library."""
    import cv2

    up = cv2.resize(map_2d.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
    up = (up - up.min()) / (up.max() - up.min())
    pred = _scipy_box_mask(up > threshold)
    gt = np.zeros((size, size), bool)
    for x0, y0, x1, y1 in gt_boxes:
        gt[y0:y1 + 1, x0:x1 + 1] = True
    tp, fp = int((pred & gt).sum()), int((pred & ~gt).sum())
    fn, tn = int((~pred & gt).sum()), int((~pred & ~gt).sum())
    return _formulas(tp, fp, fn, tn)


def test_evaluate_localization_matches_reference_pipeline():
    g = torch.Generator().manual_seed(5)
    B = 6
    maps = torch.rand(B, 1, 14, 14, generator=g) ** 3 * 10
    gt = [torch.tensor([[10, 20, 100, 150]]), torch.tensor([[0, 0, 223, 223]]),
          torch.tensor([[5, 5, 50, 50], [120, 130, 200, 220]]), torch.tensor([[60, 60, 61, 61]]),
          torch.tensor([[100, 0, 223, 90]]), torch.tensor([[30, 140, 90, 223]])]
    for threshold in (0.3, 0.5):
        got = evaluate_localization(maps, gt, threshold=threshold)
        for i in range(B):
            want = _reference_pipeline(maps[i, 0].numpy(), gt[i].tolist(), threshold, 224)
            # float32 rounding may flip a pixel that sits within ~1e-7 of the threshold: a few pixels
            # out of 50k move the metrics by far less than 1e-3
            for k in METRIC_NAMES:
                assert float(got[k][i]) == pytest.approx(want[k], rel=1e-3, abs=1e-6), (k, i)
    # batched metrics equal one-image calls, and mean() averages them
    single = [evaluate_localization(maps[i:i + 1], gt[i:i + 1]) for i in range(B)]
    batched = evaluate_localization(maps, gt)
    for k in METRIC_NAMES:
        torch.testing.assert_close(batched[k], torch.cat([s[k] for s in single]))
        assert mean(batched)[k] == pytest.approx(float(batched[k].mean()))
        assert mean({k: [s[k] for s in single]})[k] == pytest.approx(float(batched[k].mean()))
    assert len(predict_boxes(maps)) == B


def test_mean_of_nothing_is_nan():
    assert np.isnan(mean({"iou": torch.zeros(0)})["iou"])


# ------------------------------------------------------------------------------------------------
# multi-instance helpers
# ------------------------------------------------------------------------------------------------
def test_mass_inside_hand_example():
    maps = torch.tensor([[[[3.0, 1.0], [1.0, 1.0]]], [[[2.0, 1.0], [0.0, 1.0]]], [[[5.0, 5.0], [5.0, 5.0]]]])
    top_left = torch.tensor([[True, False], [False, False]])
    top_row = torch.tensor([[True, True], [False, False]])
    masks = torch.stack([top_left, top_row, top_row])
    got = mass_inside(maps, masks)
    # min-max: [[1,0],[0,0]] -> 1;  [[1,.5],[0,.5]] -> 1.5 / 2;  constant -> 0
    torch.testing.assert_close(got, torch.tensor([1.0, 0.75, 0.0]))
    # complementary masks sum to one, also after upsampling to a larger mask
    g = torch.Generator().manual_seed(2)
    m = torch.rand(2, 1, 4, 4, generator=g)
    half = torch.zeros(2, 16, 16, dtype=torch.bool)
    half[:, :, :7] = True
    torch.testing.assert_close(mass_inside(m, half) + mass_inside(m, ~half), torch.ones(2))


def test_instances_touched():
    inst = torch.zeros(3, 10, 10, dtype=torch.bool)
    inst[0, 0:2, 0:2] = True
    inst[1, 5:7, 5:7] = True
    inst[2, 9, 9] = True
    boxes = torch.tensor([[1, 1, 3, 3], [4, 4, 5, 5]])  # touches 0 at (1,1), 1 at (5,5)
    assert instances_touched(boxes, inst).tolist() == [True, True, False]
    assert not boxes_touch_instances(boxes, inst)
    assert boxes_touch_instances(torch.cat([boxes, torch.tensor([[8, 8, 9, 9]])]), inst)
    assert boxes_touch_instances(torch.tensor([[0, 0, 9, 9]]), inst)  # one big box touches all
    assert not boxes_touch_instances(torch.zeros(0, 4, dtype=torch.int64), inst)
    assert boxes_touch_instances(boxes, torch.zeros(0, 10, 10, dtype=torch.bool))  # vacuous
