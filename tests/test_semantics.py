"""Semantic checks of AGCAM on the shipped shapes ViT .

* Class specificity: on two-class images, the map for class ``a`` puts more of its mass on ``a``'s
  instances than on ``b``'s, and the other way round.
* Multi-instance coverage (report): with several instances of the class, how often the
  protocol's contour boxes of the thresholded map touch every instance.

Run with ``-s`` to see the rates; they are also recorded as junit properties.
"""


import pytest
import torch

from captum_vit.data import ShapesDataset, collate
from captum_vit.metrics import boxes_touch_instances, mass_inside, predict_boxes

#: Held-out seed: none of the training seeds (``captum_vit.zoo.training_seeds()``), nor the trainer's
#: validation and monitoring seeds 12345-12347 and 4242, nor the demo's 2024.
HELD_OUT_SEED = 2025
#: The bar for class specificity: the map for a class must favour that class's instances in at least
#: 80% of two-class images.
SPECIFICITY_MIN_RATE = 0.8


def test_held_out_seed_is_not_a_training_seed():
    from captum_vit.zoo import training_seeds

    assert HELD_OUT_SEED not in training_seeds()


@pytest.fixture(scope="module")
def trained():
    from captum_vit import AGCAM
    from captum_vit.zoo import shapes_vit

    model, cfg = shapes_vit()
    return model, cfg, AGCAM(model)


def _batches(split, size, batch_size, cfg):
    ds = ShapesDataset(split, seed=HELD_OUT_SEED, size=size, mean=cfg.get("mean", (0.5,) * 3),
                       std=cfg.get("std", (0.5,) * 3))
    for s in range(0, size, batch_size):
        yield collate([ds[i] for i in range(s, min(size, s + batch_size))])


def class_specificity(agcam, cfg, size=150, batch_size=50):
    """Per image: mass of the map for each class inside each class's instance masks."""
    rows = {"aa": [], "ab": [], "bb": [], "ba": [], "area_a": [], "area_b": []}
    for batch in _batches("pairs", size, batch_size, cfg):
        a, b = batch["label"][:, 0], batch["label"][:, 1]
        mask_a = torch.stack([m[il == int(c)].any(0) for m, il, c in zip(batch["masks"], batch["instance_labels"], a)])
        mask_b = torch.stack([m[il == int(c)].any(0) for m, il, c in zip(batch["masks"], batch["instance_labels"], b)])
        ok = mask_a.flatten(1).any(1) & mask_b.flatten(1).any(1)  # both classes actually placed
        x = batch["image"][ok]
        mask_a, mask_b = mask_a[ok], mask_b[ok]
        map_a = agcam.attribute(x, target=a[ok]).detach()
        map_b = agcam.attribute(x, target=b[ok]).detach()
        rows["aa"].append(mass_inside(map_a, mask_a))
        rows["ab"].append(mass_inside(map_a, mask_b))
        rows["bb"].append(mass_inside(map_b, mask_b))
        rows["ba"].append(mass_inside(map_b, mask_a))
        rows["area_a"].append(mask_a.flatten(1).sum(1).double())
        rows["area_b"].append(mask_b.flatten(1).sum(1).double())
    return {k: torch.cat(v) for k, v in rows.items()}


def multi_instance_touch(model, agcam, cfg, size=200, batch_size=50, threshold=0.5):
    """Correctly classified single-class images with >= 2 instances: do the boxes touch every instance?"""
    touched, n_boxes, n_inst = [], [], []
    for batch in _batches("single", size, batch_size, cfg):
        with torch.no_grad():
            pred = model(batch["image"]).argmax(-1)
        keep = [i for i in range(len(pred)) if pred[i] == batch["label"][i] and batch["masks"][i].shape[0] >= 2]
        if not keep:
            continue
        maps = agcam.attribute(batch["image"][keep], target=pred[keep]).detach()
        boxes = predict_boxes(maps, threshold=threshold, size=tuple(batch["image"].shape[-2:]))
        for j, i in enumerate(keep):
            touched.append(boxes_touch_instances(boxes[j], batch["masks"][i]))
            n_boxes.append(boxes[j].shape[0])
            n_inst.append(batch["masks"][i].shape[0])
    return touched, n_boxes, n_inst


@pytest.fixture(scope="module")
def specificity(trained):
    _, cfg, agcam = trained
    return class_specificity(agcam, cfg)


@pytest.mark.slow
def test_agcam_is_class_specific(specificity, record_property):
    r = specificity
    n = r["aa"].numel()
    assert n >= 100
    rate_a = float((r["aa"] > r["ab"]).double().mean())
    rate_b = float((r["bb"] > r["ba"]).double().mean())
    # the same comparison per pixel of the instances (two instances of one class vs one of the other)
    dens_a = float((r["aa"] / r["area_a"] > r["ab"] / r["area_b"]).double().mean())
    dens_b = float((r["bb"] / r["area_b"] > r["ba"] / r["area_a"]).double().mean())
    print(f"\n[semantics] class specificity on {n} pairs images (seed {HELD_OUT_SEED}): "
          f"map(a) favours a's instances in {rate_a:.3f}, map(b) favours b's in {rate_b:.3f} "
          f"(mass per instance pixel: {dens_a:.3f} / {dens_b:.3f}); mean mass inside own / other class: "
          f"{float(torch.cat([r['aa'], r['bb']]).mean()):.3f} / {float(torch.cat([r['ab'], r['ba']]).mean()):.3f}")
    for k, v in (("specificity_rate_a", rate_a), ("specificity_rate_b", rate_b), ("specificity_n", n)):
        record_property(k, v)
    assert rate_a >= SPECIFICITY_MIN_RATE
    assert rate_b >= SPECIFICITY_MIN_RATE


@pytest.mark.slow
def test_agcam_multi_instance_report(trained, record_property):
    model, cfg, agcam = trained
    touched, n_boxes, n_inst = multi_instance_touch(model, agcam, cfg)
    n = len(touched)
    assert n >= 30
    rate = sum(touched) / n
    more_boxes = sum(b >= k for b, k in zip(n_boxes, n_inst)) / n
    print(f"\n[semantics] multi-instance: contour boxes touch every instance in {rate:.3f} of {n} correctly "
          f"classified images with >= 2 instances (seed {HELD_OUT_SEED}); mean boxes {sum(n_boxes) / n:.2f} "
          f"for mean instances {sum(n_inst) / n:.2f}; at least one box per instance in {more_boxes:.3f}")
    record_property("multi_instance_rate", rate)
    record_property("multi_instance_n", n)


#: Pairs whose two classes cover comparable areas: neither class's masks more than 1.5x the other's.
COMPARABLE_AREA_RATIO = 1.5


@pytest.mark.slow
def test_agcam_is_class_specific_on_comparable_areas(specificity, record_property):
    """The raw-mass rule, on the pairs where mass is not decided by area alone.

    Not a substitute for the rule on all pairs (the test above, the 80% bar): this one guards
    the class-specific part of the maps on its own, so a regression to objectness maps (mass
    following area) fails here even where the unbalanced pairs happen to go the right way.
    """
    r = specificity
    ratio = r["area_b"] / r["area_a"]
    keep = (ratio <= COMPARABLE_AREA_RATIO) & (ratio >= 1.0 / COMPARABLE_AREA_RATIO)
    n = int(keep.sum())
    assert n >= 40
    wins_a, wins_b = r["aa"] > r["ab"], r["bb"] > r["ba"]
    rate_a = float(wins_a[keep].double().mean())
    rate_b = float(wins_b[keep].double().mean())
    # the unbalanced rest, for the report: when b's masks are > 1.5x a's, map(a) rarely wins on raw mass
    big_b = ratio > COMPARABLE_AREA_RATIO
    big_a = ratio < 1.0 / COMPARABLE_AREA_RATIO
    print(f"\n[semantics] class specificity on the {n} pairs images with areas within {COMPARABLE_AREA_RATIO}x "
          f"(seed {HELD_OUT_SEED}): {rate_a:.3f} / {rate_b:.3f}; map(a) wins when b is larger: "
          f"{float(wins_a[big_b].double().mean()):.3f} ({int(big_b.sum())} images), "
          f"map(b) wins when a is larger: {float(wins_b[big_a].double().mean()):.3f} ({int(big_a.sum())} images)")
    for k, v in (("specificity_comparable_rate_a", rate_a), ("specificity_comparable_rate_b", rate_b),
                 ("specificity_comparable_n", n)):
        record_property(k, v)
    assert rate_a >= SPECIFICITY_MIN_RATE
    assert rate_b >= SPECIFICITY_MIN_RATE


# ------------------------------------------------------------------ CDAM: what its sign and concepts mean
#: Seed of the example images that define CDAM's concept vectors (16 per class): held out like the others.
CONCEPT_SEED = 3031
#: "Near zero" for CDAM on the other class's instances: a mean at most this fraction of the map's max |value|.
CDAM_NEAR_ZERO = 0.05


@pytest.fixture(scope="module")
def cdam_pairs(trained):
    """Per two-class image: CDAM for class a, upsampled, averaged over a's and over b's instance pixels."""
    from captum_vit import CDAM

    model, cfg, _ = trained
    cdam = CDAM(model)
    mean, std = cfg.get("mean", (0.5,) * 3), cfg.get("std", (0.5,) * 3)
    examples = ShapesDataset("single", seed=CONCEPT_SEED, size=240, mean=mean, std=std)
    by_class = {}
    for i in range(len(examples)):
        item = examples[i]
        by_class.setdefault(int(item["label"]), []).append(item["image"])
    concepts = {c: torch.stack(images[:16]) for c, images in by_class.items()}
    on_a, on_b, scale, corr = [], [], [], []
    for batch in _batches("pairs", 150, 50, cfg):
        a, b = batch["label"][:, 0], batch["label"][:, 1]
        mask_a = torch.stack([m[il == int(c)].any(0) for m, il, c in zip(batch["masks"], batch["instance_labels"], a)])
        mask_b = torch.stack([m[il == int(c)].any(0) for m, il, c in zip(batch["masks"], batch["instance_labels"], b)])
        ok = mask_a.flatten(1).any(1) & mask_b.flatten(1).any(1)
        x, a, mask_a, mask_b = batch["image"][ok], a[ok], mask_a[ok], mask_b[ok]
        grid = cdam.attribute(x, target=a)
        up = torch.nn.functional.interpolate(grid, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)[:, 0]
        on_a.append((up * mask_a).flatten(1).sum(1) / mask_a.flatten(1).sum(1))
        on_b.append((up * mask_b).flatten(1).sum(1) / mask_b.flatten(1).sum(1))
        scale.append(up.flatten(1).abs().amax(1))
        for c in a.unique().tolist():
            sel = a == c
            by_class_map = grid[sel].flatten(1)
            by_concept = cdam.attribute(x[sel], concept=concepts[c]).flatten(1)
            corr.append(torch.nn.functional.cosine_similarity(
                by_class_map - by_class_map.mean(1, keepdim=True), by_concept - by_concept.mean(1, keepdim=True)))
    return {"on_a": torch.cat(on_a), "on_b": torch.cat(on_b), "scale": torch.cat(scale), "corr": torch.cat(corr)}


@pytest.mark.slow
def test_cdam_sign_is_evidence_for_the_class(cdam_pairs, record_property):
    r = cdam_pairs
    n = r["on_a"].numel()
    assert n >= 100
    positive_on_own = float((r["on_a"] > 0).double().mean())
    negative_on_other = float((r["on_b"] <= 0).double().mean())
    not_positive_on_other = float((r["on_b"] <= CDAM_NEAR_ZERO * r["scale"]).double().mean())
    both = float(((r["on_a"] > 0) & (r["on_b"] <= CDAM_NEAR_ZERO * r["scale"])).double().mean())
    print(f"\n[semantics] CDAM for class a on {n} two-class images (seed {HELD_OUT_SEED}): positive on a's instances "
          f"in {positive_on_own:.3f}; on b's instances negative in {negative_on_other:.3f}, negative or near zero "
          f"(<= {CDAM_NEAR_ZERO} x max|map|) in {not_positive_on_other:.3f}; both in {both:.3f}")
    for k, v in (("cdam_positive_on_own", positive_on_own), ("cdam_negative_on_other", negative_on_other),
                 ("cdam_not_positive_on_other", not_positive_on_other), ("cdam_both", both)):
        record_property(k, v)
    assert positive_on_own >= 0.8
    assert not_positive_on_other >= 0.85
    assert both >= 0.75


@pytest.mark.slow
def test_cdam_concept_from_examples_matches_the_class_target(cdam_pairs, record_property):
    corr = cdam_pairs["corr"]
    mean, median = float(corr.mean()), float(corr.median())
    print(f"\n[semantics] CDAM with the concept of 16 example images of class a vs CDAM for class a, on "
          f"{corr.numel()} two-class images: Pearson r mean {mean:.3f}, median {median:.3f}, "
          f"share above 0.5: {float((corr > 0.5).double().mean()):.3f}")
    record_property("cdam_concept_corr_mean", mean)
    record_property("cdam_concept_corr_median", median)
    assert median >= 0.7
    assert mean >= 0.6
