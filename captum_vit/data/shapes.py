"""Synthetic weakly-supervised localization dataset of coloured shapes.

Every image carries one image-level label (split ``"single"``) or two
(split ``"pairs"``) plus, for evaluation only, per-instance masks and boxes.
Items are generated on the fly and deterministically: item ``i`` depends only
on ``(seed, split, i)`` through ``np.random.default_rng([seed, split_code, i])``,
so the same bytes come out in any process or on any machine (pure numpy + PIL,
no float transcendental functions on arrays).

Image content
-------------
* label shapes (:data:`CLASSES`): disk, square, triangle, star, cross, ring,
  crescent, heart; each instance has its own colour, fill texture (solid,
  stripes, checker, noise), size (longest side ~36-90 px at 224), rotation and
  aspect ratio (0.75-1.33). 1-4 instances of the label class per image
  (``"pairs"``: 1-2 instances of each of two different classes); instances do
  not overlap (a gap of >= 3 px between their boxes), so each mask is the
  whole shape.
* clutter that is never a label class: thin random lines (1-2 px) and small
  dots (<= 9 px), drawn *below* the shapes.
* background: a flat colour with one or two textured half-planes, a linear
  gradient, or a crop of one of scikit-image's bundled photos
  (astronaut/coffee/chelsea/rocket/camera/brick/grass/gravel).

Box convention (the one :mod:`captum_vit.metrics.localization` uses): ``boxes[k] = (xmin, ymin, xmax, ymax)`` are the
INCLUSIVE tight bounds of ``masks[k]``; the box as a mask is
``m[ymin:ymax + 1, xmin:xmax + 1] = True``.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["CLASSES", "ShapesDataset", "collate", "generate", "SPLITS"]

CLASSES: List[str] = ["disk", "square", "triangle", "star", "cross", "ring", "crescent", "heart"]
SPLITS = {"single": 1, "pairs": 2}

_PHOTO_NAMES = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel")
_PHOTOS: List[np.ndarray] | None = None


def _photos() -> List[np.ndarray]:
    """scikit-image's bundled photos as uint8 HxWx3, loaded once per process."""
    global _PHOTOS
    if _PHOTOS is None:
        imgs = []
        try:
            import skimage.data as skd

            for name in _PHOTO_NAMES:
                a = np.asarray(getattr(skd, name)())
                if a.ndim == 2:
                    a = np.repeat(a[:, :, None], 3, axis=2)
                imgs.append(np.ascontiguousarray(a[:, :, :3].astype(np.uint8)))
        except Exception:  # pragma: no cover - scikit-image missing: no photo backgrounds
            imgs = []
        _PHOTOS = imgs
    return _PHOTOS


# ----------------------------------------------------------------------------------------------
# shape outlines, as polygons in a unit frame (roughly [-1, 1]^2); rings/crescents have holes
# ----------------------------------------------------------------------------------------------
def _circle_pts(n: int = 48, r: float = 1.0, cx: float = 0.0, cy: float = 0.0) -> np.ndarray:
    t = np.array([2.0 * math.pi * k / n for k in range(n)])
    return np.stack([cx + r * np.array([math.cos(a) for a in t]), cy + r * np.array([math.sin(a) for a in t])], 1)


def _regular(n: int, phase: float = -math.pi / 2) -> np.ndarray:
    return np.array([[math.cos(phase + 2 * math.pi * k / n), math.sin(phase + 2 * math.pi * k / n)] for k in range(n)])


def _star(inner: float = 0.45) -> np.ndarray:
    pts = []
    for k in range(10):
        r = 1.0 if k % 2 == 0 else inner
        a = -math.pi / 2 + math.pi * k / 5
        pts.append([r * math.cos(a), r * math.sin(a)])
    return np.array(pts)


def _cross(w: float = 0.36) -> np.ndarray:
    return np.array([[-w, -1], [w, -1], [w, -w], [1, -w], [1, w], [w, w], [w, 1], [-w, 1],
                     [-w, w], [-1, w], [-1, -w], [-w, -w]], dtype=np.float64)


def _heart(n: int = 48) -> np.ndarray:
    pts = []
    for k in range(n):
        t = 2 * math.pi * k / n
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        pts.append([x, -y])
    p = np.array(pts)
    p -= (p.max(0) + p.min(0)) / 2
    return p / np.abs(p).max()


# (outer polygon, hole polygon or None) per class; the hole is filled with background
_SHAPES = {
    "disk": lambda rng: (_circle_pts(), None),
    "square": lambda rng: (np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) * 0.8, None),
    "triangle": lambda rng: (_regular(3) * np.array([1.0, 1.0]) + np.array([0.0, 0.2]), None),
    "star": lambda rng: (_star(float(rng.uniform(0.38, 0.5))), None),
    "cross": lambda rng: (_cross(float(rng.uniform(0.28, 0.38))), None),
    "ring": lambda rng: (_circle_pts(), _circle_pts(r=float(rng.uniform(0.45, 0.62)))),
    "crescent": lambda rng: (_circle_pts(), _circle_pts(r=float(rng.uniform(0.75, 0.9)),
                                                         cx=float(rng.uniform(0.4, 0.55)), cy=0.0)),
    "heart": lambda rng: (_heart(), None),
}


def _transform(pts: np.ndarray, scale: float, aspect: float, angle: float) -> np.ndarray:
    p = pts * np.array([scale * aspect, scale])
    c, s = math.cos(angle), math.sin(angle)
    return p @ np.array([[c, s], [-s, c]])


def _shape_mask(cls: str, rng: np.random.Generator, size: float) -> np.ndarray:
    """Boolean mask (tight) of one shape instance whose longest side is about ``size`` px."""
    outer, hole = _SHAPES[cls](rng)
    aspect = float(np.exp(rng.uniform(math.log(0.75), math.log(1.33))))
    angle = float(rng.uniform(0, 2 * math.pi))
    o = _transform(outer, 1.0, aspect, angle)
    ext = (o.max(0) - o.min(0)).max()
    k = size / ext
    o = o * k
    h = _transform(hole, 1.0, aspect, angle) * k if hole is not None else None
    off = -o.min(0) + 1.0
    o = o + off
    w_, h_ = int(math.ceil(o[:, 0].max())) + 2, int(math.ceil(o[:, 1].max())) + 2
    im = Image.new("L", (w_, h_), 0)
    d = ImageDraw.Draw(im)
    d.polygon([(float(x), float(y)) for x, y in o], fill=255)
    if h is not None:
        h = h + off
        d.polygon([(float(x), float(y)) for x, y in h], fill=0)
    m = np.asarray(im) > 127
    ys, xs = np.nonzero(m)
    return m[ys.min():ys.max() + 1, xs.min():xs.max() + 1]


# ----------------------------------------------------------------------------------------------
# textures
# ----------------------------------------------------------------------------------------------
def _rand_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _texture(rng: np.random.Generator, h: int, w: int, c1: np.ndarray, c2: np.ndarray, kind: int,
             noise_std: float = 28.0) -> np.ndarray:
    """float32 HxWx3 texture: 0 solid, 1 stripes, 2 checker, 3 noise."""
    if kind == 0:
        out = np.empty((h, w, 3), np.float32)
        out[:] = c1
        return out
    if kind == 3:
        out = c1 + rng.normal(0.0, noise_std, (h, w, 3)).astype(np.float32)
        return out
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    ang = float(rng.uniform(0, math.pi))
    ca, sa = math.cos(ang), math.sin(ang)
    period = float(rng.uniform(6, 14))
    if kind == 1:
        sel = (np.floor((xx * ca + yy * sa) / (period / 2)) % 2) > 0
    else:
        u = xx * ca + yy * sa
        v = -xx * sa + yy * ca
        sel = ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2) > 0
    return np.where(sel[:, :, None], c2[None, None], c1[None, None]).astype(np.float32)


def _background(rng: np.random.Generator, S: int) -> np.ndarray:
    kind = rng.choice(3, p=[0.4, 0.25, 0.35])
    photos = _photos()
    if kind == 2 and photos:
        src = photos[int(rng.integers(len(photos)))]
        H, W = src.shape[:2]
        side = int(rng.integers(min(H, W) // 3, min(H, W) + 1))
        y0 = int(rng.integers(0, H - side + 1))
        x0 = int(rng.integers(0, W - side + 1))
        crop = Image.fromarray(src[y0:y0 + side, x0:x0 + side])
        bg = np.asarray(crop.resize((S, S), Image.Resampling.BILINEAR), dtype=np.float32)
        if rng.random() < 0.5:
            bg = bg[:, ::-1]
        # soften the photo towards its mean sometimes so shapes stay readable
        a = float(rng.uniform(0.4, 0.85))
        return bg * a + bg.mean((0, 1)) * (1 - a)
    if kind == 1:
        c1, c2 = _rand_color(rng), _rand_color(rng)
        ang = float(rng.uniform(0, 2 * math.pi))
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        t = (xx - S / 2) * math.cos(ang) + (yy - S / 2) * math.sin(ang)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        bg = c1 * (1 - t[:, :, None]) + c2 * t[:, :, None]
        if rng.random() < 0.3:
            bg = bg + rng.normal(0, 8, (S, S, 3)).astype(np.float32)
        return bg
    # flat colour with one or two textured half-planes (never compact blobs: no confusion with shapes)
    bg = np.empty((S, S, 3), np.float32)
    bg[:] = _rand_color(rng)
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    for _ in range(int(rng.integers(1, 3))):
        ang = float(rng.uniform(0, 2 * math.pi))
        off = float(rng.uniform(-0.2, 0.2)) * S
        side = ((xx - S / 2) * math.cos(ang) + (yy - S / 2) * math.sin(ang)) > off
        tex = _texture(rng, S, S, _rand_color(rng), _rand_color(rng), int(rng.integers(1, 4)), noise_std=20.0)
        bg = np.where(side[:, :, None], tex, bg)
    return bg


def _clutter(rng: np.random.Generator, img: Image.Image, S: int) -> None:
    d = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 5))):  # thin lines
        x0, y0 = rng.uniform(0, S, 2)
        ang = rng.uniform(0, 2 * math.pi)
        ln = rng.uniform(30, 150) * S / 224
        x1, y1 = x0 + ln * math.cos(ang), y0 + ln * math.sin(ang)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        d.line([(float(x0), float(y0)), (float(x1), float(y1))], fill=col, width=int(rng.integers(1, 3)))
    for _ in range(int(rng.integers(0, 8))):  # small dots
        r = float(rng.uniform(1.5, 4.5)) * S / 224
        x, y = rng.uniform(0, S, 2)
        col = tuple(int(v) for v in rng.integers(0, 256, 3))
        d.ellipse([float(x - r), float(y - r), float(x + r), float(y + r)], fill=col)


# ----------------------------------------------------------------------------------------------
# full sample
# ----------------------------------------------------------------------------------------------
def _place(rng: np.random.Generator, placed: List[Tuple[int, int, int, int]], h: int, w: int, S: int,
           gap: int = 3):
    for _ in range(60):
        x0 = int(rng.integers(0, S - w + 1))
        y0 = int(rng.integers(0, S - h + 1))
        box = (x0, y0, x0 + w - 1, y0 + h - 1)
        if all(box[0] > b[2] + gap or box[2] < b[0] - gap or box[1] > b[3] + gap or box[3] < b[1] - gap
               for b in placed):
            return box
    return None


def _place_shape(rng: np.random.Generator, cls: int, lo: float, hi: float,
                 placed: List[Tuple[int, int, int, int]], S: int):
    """Draw a shape of class ``cls`` (size in [lo, hi) at 224 px) and a free spot for it, shrinking it
    by 15% per failed try (8 tries). Returns ``(mask, box)`` or ``None``."""
    size = float(rng.uniform(lo, hi)) * S / 224
    for _ in range(8):
        m = _shape_mask(CLASSES[cls], rng, size)
        box = _place(rng, placed, m.shape[0], m.shape[1], S)
        if box is not None:
            return m, box
        size *= 0.85
    return None


def generate(seed: int, split: str, index: int, image_size: int = 224, easy: bool = False) -> Dict[str, Any]:
    """Render item ``index`` of ``split`` for ``seed`` as plain numpy arrays.

    Returns a dict with ``image_uint8`` (HxWx3 uint8), ``label`` (int, or (a, b) for pairs),
    ``boxes`` (n x 4 int64, inclusive), ``masks`` (n x H x W bool), ``instance_labels`` (n int64).

    ``easy=True`` (training curriculum only; a separate random stream) draws flat/gradient
    backgrounds without clutter, solid or striped fills and at most two (larger) instances per class.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    S = int(image_size)
    if easy:
        return _generate_easy(seed, split, index, S)
    rng = np.random.default_rng([int(seed), SPLITS[split], int(index)])
    nc = len(CLASSES)
    if split == "single":
        c = int(rng.integers(nc))
        label: Union[int, Tuple[int, int]] = c
        want = [c] * int(rng.choice([1, 2, 3, 4], p=[0.4, 0.25, 0.2, 0.15]))
    else:
        a, b = (int(v) for v in rng.choice(nc, 2, replace=False))
        label = (min(a, b), max(a, b))
        want = [a] * int(rng.integers(1, 3)) + [b] * int(rng.integers(1, 3))
        want = [want[k] for k in rng.permutation(len(want))]
    n = len(want)
    lo, hi = {1: (56, 90), 2: (48, 88), 3: (42, 78), 4: (36, 70)}[n]

    bg = _background(rng, S)
    bgimg = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    if rng.random() < 0.7:
        _clutter(rng, bgimg, S)
    img = np.asarray(bgimg, dtype=np.float32).copy()

    boxes: List[Tuple[int, int, int, int]] = []
    masks: List[np.ndarray] = []
    labels: List[int] = []
    for cls in want:
        placed = _place_shape(rng, cls, lo, hi, boxes, S)
        if placed is None:
            continue
        m, box = placed
        x0, y0, x1, y1 = box
        region = img[y0:y1 + 1, x0:x1 + 1]
        # a colour that contrasts with the local background
        bg_mean = region[m].mean(0) if m.any() else region.reshape(-1, 3).mean(0)
        cands = rng.integers(0, 256, (6, 3)).astype(np.float32)
        c1 = cands[int(np.argmax(np.abs(cands - bg_mean).sum(1)))]
        shift = rng.uniform(35, 70) * np.where(c1 > 127, -1.0, 1.0)
        c2 = np.clip(c1 + shift.astype(np.float32), 0, 255).astype(np.float32)
        kind = int(rng.choice(4, p=[0.4, 0.2, 0.2, 0.2]))
        tex = _texture(rng, m.shape[0], m.shape[1], c1, c2, kind, noise_std=18.0)
        region[m] = tex[m]
        full = np.zeros((S, S), bool)
        full[y0:y1 + 1, x0:x1 + 1] = m
        boxes.append(box)
        masks.append(full)
        labels.append(cls)

    out_labels = np.array(labels, np.int64)
    return {
        "image_uint8": np.clip(np.rint(img), 0, 255).astype(np.uint8),
        "label": label,
        "boxes": np.array(boxes, np.int64).reshape(-1, 4),
        "masks": np.stack(masks) if masks else np.zeros((0, S, S), bool),
        "instance_labels": out_labels,
    }


def _generate_easy(seed: int, split: str, index: int, S: int) -> Dict[str, Any]:
    rng = np.random.default_rng([int(seed), 100 + SPLITS[split], int(index)])
    nc = len(CLASSES)
    if split == "single":
        c = int(rng.integers(nc))
        label: Union[int, Tuple[int, int]] = c
        want = [c] * int(rng.integers(1, 3))
    else:
        a, b = (int(v) for v in rng.choice(nc, 2, replace=False))
        label = (min(a, b), max(a, b))
        want = [a, b]
    lo, hi = (60, 100) if len(want) == 1 else (48, 90)
    if rng.random() < 0.5:
        img = np.empty((S, S, 3), np.float32)
        img[:] = _rand_color(rng)
    else:
        c1, c2 = _rand_color(rng), _rand_color(rng)
        yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
        t = (xx + yy) / float(2 * S - 2) if rng.random() < 0.5 else xx / float(S - 1)
        img = c1 * (1 - t[:, :, None]) + c2 * t[:, :, None]
    boxes: List[Tuple[int, int, int, int]] = []
    masks: List[np.ndarray] = []
    labels: List[int] = []
    for cls in want:
        placed = _place_shape(rng, cls, lo, hi, boxes, S)
        if placed is None:
            continue
        m, box = placed
        x0, y0, x1, y1 = box
        region = img[y0:y1 + 1, x0:x1 + 1]
        bg_mean = region[m].mean(0)
        cands = rng.integers(0, 256, (6, 3)).astype(np.float32)
        c1 = cands[int(np.argmax(np.abs(cands - bg_mean).sum(1)))]
        c2 = np.clip(c1 + 80.0 * np.where(c1 > 127, -1.0, 1.0), 0, 255).astype(np.float32)
        tex = _texture(rng, m.shape[0], m.shape[1], c1, c2, int(rng.choice(2, p=[0.7, 0.3])))
        region[m] = tex[m]
        full = np.zeros((S, S), bool)
        full[y0:y1 + 1, x0:x1 + 1] = m
        boxes.append(box)
        masks.append(full)
        labels.append(cls)
    return {
        "image_uint8": np.clip(np.rint(img), 0, 255).astype(np.uint8),
        "label": label,
        "boxes": np.array(boxes, np.int64).reshape(-1, 4),
        "masks": np.stack(masks),
        "instance_labels": np.array(labels, np.int64),
    }


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style synthetic shapes dataset (see module docstring).

    Args:
        split: ``"single"`` (one label class, 1-4 instances) or ``"pairs"`` (two different classes,
            1-2 instances each; ``label`` is the sorted tuple ``(a, b)``).
        seed: dataset seed; item ``i`` depends only on ``(seed, split, i)``.
        size: number of items.
        image_size: side of the square images (shape sizes scale with it).
        mean, std: normalisation of ``image``.

    Attributes:
        classes: the label classes (:data:`CLASSES`), ``classes[label]``.
        num_classes: ``len(classes)``; labels lie in ``0..num_classes - 1``, so a model head needs at
            least this many outputs.
    """

    classes = CLASSES
    num_classes = len(CLASSES)

    def __init__(self, split: str = "single", seed: int = 0, size: int = 1000, image_size: int = 224,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.5, 0.5, 0.5)):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
        self.split, self.seed, self.size, self.image_size = split, int(seed), int(size), int(image_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return self.size

    def raw(self, index: int) -> Dict[str, Any]:
        """The numpy sample (no tensor conversion)."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        return generate(self.seed, self.split, index, self.image_size)

    def normalize(self, image_uint8: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image_uint8)).permute(2, 0, 1).float().div_(255.0)
        return (x - self.mean) / self.std

    def __getitem__(self, index: int) -> Dict[str, Any]:
        if index < 0:
            index += self.size
        s = self.raw(index)
        return {
            "image": self.normalize(s["image_uint8"]),
            "image_uint8": s["image_uint8"],
            "label": s["label"],
            "boxes": torch.from_numpy(s["boxes"]),
            "masks": torch.from_numpy(s["masks"]),
            "instance_labels": torch.from_numpy(s["instance_labels"]),
            "index": index,
        }


def collate(batch: List[Dict[str, Any]]) -> Dict[str, Any]:
    """DataLoader collate: stacks ``image`` / ``image_uint8`` / ``label`` / ``index``, keeps the
    variable-length ``boxes`` / ``masks`` / ``instance_labels`` as lists."""
    out: Dict[str, Any] = {
        "image": torch.stack([b["image"] for b in batch]),
        "image_uint8": torch.stack([torch.as_tensor(np.ascontiguousarray(b["image_uint8"])) for b in batch]),
        "label": torch.tensor([b["label"] for b in batch], dtype=torch.int64),
        "index": torch.tensor([b.get("index", -1) for b in batch], dtype=torch.int64),
    }
    for k in ("boxes", "masks", "instance_labels"):
        out[k] = [b[k] for b in batch]
    return out
