"""Helpers shared by the test modules: tiny models, comparisons, model-state snapshots and dataset trees.

The one home of what more than one test module uses, so that no test module imports another.
tests/reference.py and tests/reference_methods.py stay apart: they are the independent references.
Subprocess scripts embedded in tests import this module too, after putting tests/ on sys.path.
"""

import contextlib
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

# ----------------------------------------------------------------------------------------- tiny ViTs
# Random init, CPU, fast.

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=10)


def _perturb(model, seed=0, scale=0.05):
    """Random-init timm ViTs start close to symmetric; a seeded perturbation makes maps non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model


def make_timm(variant: str):
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kw = dict(TINY)
    if variant == "plain":
        m = VisionTransformer(**kw, qkv_bias=True)
    elif variant == "qk_norm":
        m = VisionTransformer(**kw, qk_norm=True)
    elif variant == "layerscale":
        m = VisionTransformer(**kw, init_values=0.5)
    elif variant == "distilled":
        m = VisionTransformerDistilled(**kw)
    elif variant == "registers":
        m = VisionTransformer(**kw, reg_tokens=4)
    elif variant == "dynamic":
        m = VisionTransformer(**kw, dynamic_img_size=True)
    elif variant == "scale_norm":  # attention output normalised: one-token engine does not apply
        m = VisionTransformer(**kw, scale_attn_norm=True)
    elif variant == "respost":  # post-norm blocks: the parts do not cover them (patched fallback)
        from timm.models.vision_transformer import ResPostBlock

        m = VisionTransformer(**kw, block_fn=ResPostBlock)
    elif variant == "convstem":  # the shipped model's architecture: convolutional stem, same token grid
        from captum_vit.zoo.shapes import build_shapes_vit

        m = build_shapes_vit(dict(img_size=64, patch_size=16, embed_dim=48, depth=3, num_heads=4, stem="conv"), 10)
    elif variant == "avgpool":
        m = VisionTransformer(**kw, class_token=False, global_pool="avg")
    else:
        raise KeyError(variant)
    return _perturb(m).eval()


def make_hf():
    import transformers  # a dev dependency: a missing one fails the tests rather than skipping them

    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        image_size=64, patch_size=8, hidden_size=48, num_hidden_layers=3, num_attention_heads=4,
        intermediate_size=96, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return _perturb(transformers.ViTForImageClassification(cfg)).eval()


def input_for(variant: str, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h, w = (48, 80) if variant == "dynamic" else (64, 64)
    return torch.randn(batch, 3, h, w, generator=g)


ARCHS = ["plain", "qk_norm", "layerscale", "distilled", "registers", "dynamic", "convstem", "hf"]


def make(variant: str):
    return make_hf() if variant == "hf" else make_timm(variant)


# ----------------------------------------------------------------------------------------- comparisons


def _close(a, b, rel=1e-5):
    scale = max(b.abs().max().item(), 1e-12)
    assert (a - b).abs().max().item() <= rel * scale, f"max diff {(a - b).abs().max().item()} vs scale {scale}"


# ----------------------------------------------------------------------------------------- leaves the model as found


def _state(model):
    s = []
    for name, mod in model.named_modules():
        s.append(
            (
                name,
                tuple(mod._forward_hooks),
                tuple(mod._forward_pre_hooks),
                tuple(mod._backward_hooks),
                tuple(getattr(mod, "_backward_pre_hooks", {})),
                "forward" in mod.__dict__,
                mod.training,
                getattr(mod, "fused_attn", None),
            )
        )
    s.append(tuple((n, p.requires_grad) for n, p in model.named_parameters()))
    return s


def raise_inside_block_1_mlp(model, make_methods, x, target=(1, 2)):
    """A user's hook raising inside block 1's MLP, during each method's ``attribute``: the error
    reaches the caller, and no patched forward, hook or flag of ours is left behind.

    ``make_methods``: callables building a method from the model, each called (and its method run)
    while the hook is in place. Returns the model's state from before, for further checks.
    """
    before = _state(model)
    blocks = model.blocks if hasattr(model, "blocks") else model.vit.layers  # timm, Hugging Face

    def boom(_m, _args):
        raise RuntimeError("boom")

    handle = blocks[1].mlp.fc1.register_forward_pre_hook(boom)
    try:
        for make_method in make_methods:
            with pytest.raises(RuntimeError, match="boom"):
                make_method(model).attribute(x, target=list(target))
    finally:
        handle.remove()
    assert _state(model) == before
    return before


# ----------------------------------------------------------------------------------------- dataset trees
# Tiny fixture trees written in each dataset's own file formats.

S = 32  # small input size keeps the tests fast; the rules do not depend on it


def _write_image(path, size, seed, fmt="JPEG"):
    w, h = size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, fmt)


def _write_corrupt(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a jpeg")


def _voc_xml(path, size, objects, bad_field=False):
    w, h = size
    objs = []
    for name, (x0, y0, x1, y1), *rest in objects:
        difficult = rest[0] if rest else 0
        xmin = "abc" if bad_field else str(x0)
        objs.append(f"<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{xmin}</xmin>"
                    f"<ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox></object>")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"<annotation><filename>x</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{''.join(objs)}</annotation>")


# ImageNet: three real ImageNet-1k wnids, canonical indices 2, 5 and 9 (under 10, the tiny test models' head)
WNID_2, WNID_5, WNID_9 = "n01484850", "n01496331", "n01518878"
# (image id, wnid, (w, h), boxes of its class, boxes of another class present in the XML only)
IMNET = [
    ("ILSVRC2012_val_00000001", WNID_9, (100, 50), [(10, 5, 59, 39), (70, 0, 99, 49)], [(0, 0, 5, 5)]),
    ("ILSVRC2012_val_00000002", WNID_2, (64, 80), [(0, 0, 63, 79)], []),
    ("ILSVRC2012_val_00000003", WNID_5, (30, 30), [(3, 4, 30, 25)], []),
]
# hand-computed at S = 32
IMNET_EXPECTED = {
    "ILSVRC2012_val_00000001": (9, [[3, 3, 18, 24], [22, 0, 31, 31]]),
    "ILSVRC2012_val_00000002": (2, [[0, 0, 31, 31]]),
    "ILSVRC2012_val_00000003": (5, [[3, 4, 31, 26]]),  # xmax = width -> 32 -> clipped to 31
}


def _imagenet_folders(root, extra=()):
    """Layout (a); class folders created in reverse-sorted order so that listing order cannot give labels."""
    data = os.path.join(root, "Data", "CLS-LOC", "val")
    ann = os.path.join(root, "Annotations", "CLS-LOC", "val")
    os.makedirs(ann, exist_ok=True)
    for k, (iid, wnid, size, boxes, others) in enumerate(IMNET):
        _write_image(os.path.join(data, wnid, iid + ".JPEG"), size, seed=k)
        _voc_xml(os.path.join(ann, iid + ".xml"), size, [(wnid, b) for b in boxes] + [("n00000042", b)
                                                                                         for b in others])
    for iid, wnid, kind in extra:
        img = os.path.join(data, wnid, iid + ".JPEG")
        if kind == "corrupt":
            _write_corrupt(img)
            _voc_xml(os.path.join(ann, iid + ".xml"), (20, 20), [(wnid, (1, 1, 5, 5))])
        elif kind == "bad_xml":
            _write_image(img, (20, 20), seed=99)
            _voc_xml(os.path.join(ann, iid + ".xml"), (20, 20), [(wnid, (1, 1, 5, 5))], bad_field=True)
        elif kind == "size_mismatch":
            _write_image(img, (20, 20), seed=98)
            _voc_xml(os.path.join(ann, iid + ".xml"), (40, 20), [(wnid, (1, 1, 5, 5))])
    return root


def _imagenet_csv(src_root, root, mapping=None):
    """Layout (b) from the same image bytes, csv rows in reverse order."""
    data = os.path.join(root, "Data", "CLS-LOC", "val")
    os.makedirs(data)
    rows = []
    for iid, wnid, _, boxes, _ in reversed(IMNET):
        shutil.copyfile(os.path.join(src_root, "Data", "CLS-LOC", "val", wnid, iid + ".JPEG"),
                        os.path.join(data, iid + ".JPEG"))
        rows.append(f"{iid}," + " ".join(f"{wnid} {x0} {y0} {x1} {y1}" for x0, y0, x1, y1 in boxes) + " ")
    with open(os.path.join(root, "LOC_val_solution.csv"), "w") as f:
        f.write("ImageId,PredictionString\n" + "\n".join(rows) + "\n")
    if mapping is not None:
        with open(os.path.join(root, "LOC_synset_mapping.txt"), "w") as f:
            f.write("".join(f"{w} some name, other name\n" for w in mapping))
    return root


def _voc(root, unknown_class=False):
    base = os.path.join(root, "VOC2012")
    objects = {
        "2012_000001": ((60, 40), [("cat", (1, 1, 30, 20)), ("cat", (31, 10, 60, 40), 1)]),
        "2012_000002": ((50, 50), [("cat", (1, 1, 10, 10)), ("dog", (20, 20, 40, 40))]),
        "2012_000003": ((40, 80), [("dog", (5, 10, 35, 70))]),
        "2012_000004": ((40, 40), [("bird", (5, 5, 10, 10))]),  # not in val.txt
        "2012_000005": ((40, 40), []),  # no object: not single-class
    }
    if unknown_class:
        objects["2012_000006"] = ((40, 40), [("unicorn", (5, 5, 10, 10))])
    for k, (iid, (size, objs)) in enumerate(objects.items()):
        _write_image(os.path.join(base, "JPEGImages", iid + ".jpg"), size, seed=10 + k)
        _voc_xml(os.path.join(base, "Annotations", iid + ".xml"), size, objs)
    os.makedirs(os.path.join(base, "ImageSets", "Main"))
    val = [i for i in objects if i != "2012_000004"]
    with open(os.path.join(base, "ImageSets", "Main", "val.txt"), "w") as f:
        f.write("\n".join(val) + "\n")
    return root


def _cub(root, bad_box=False, corrupt=False):
    base = os.path.join(root, "CUB_200_2011")
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    # id: (relative path, class id, is_train, (w, h), (x, y, width, height))
    items = {
        1: (f"{classes[0]}/a_1.jpg", 1, 1, (50, 50), (1.0, 2.0, 10.0, 10.0)),
        2: (f"{classes[2]}/c_2.jpg", 3, 0, (60, 40), (10.0, 5.0, 30.0, 20.0)),
        3: (f"{classes[1]}/b_3.jpg", 2, 0, (40, 40), (0.0, 0.0, 39.5, 40.0)),
        10: (f"{classes[0]}/a_10.jpg", 1, 0, (30, 30), (2.0, 2.0, 4.0, 4.0)),
    }
    for k, (rel, _, _, size, _) in items.items():
        path = os.path.join(base, "images", *rel.split("/"))
        if corrupt and k == 10:
            _write_corrupt(path)
        else:
            _write_image(path, size, seed=20 + k)

    def table(name, rows):
        with open(os.path.join(base, name), "w") as f:
            f.write("".join(" ".join(str(v) for v in r) + "\n" for r in rows))

    order = [10, 3, 1, 2]  # lists need not be sorted
    table("images.txt", [(k, items[k][0]) for k in order])
    table("image_class_labels.txt", [(k, items[k][1]) for k in order])
    table("train_test_split.txt", [(k, items[k][2]) for k in order])
    table("bounding_boxes.txt", [(k, *(("x1.0", 1, 1, 1) if bad_box and k == 3 else items[k][4])) for k in order])
    table("classes.txt", [(i + 1, c) for i, c in enumerate(classes)])
    return root


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread inside the block, restored after: runs compared bit for bit, and
    threads that each stand for a caller, use one thread each."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------- ViT families
# Tiny, eval-mode, random-init (seeded, then _perturb) models of every family the package is being
# extended to. A family whose class or option the installed timm / transformers lacks skips with a reason
# (the suite also runs on timm 1.0.16); a missing transformers fails, as make_hf does.

from typing import Callable, Dict  # noqa: E402  (this section's own; the module's imports above stay as they were)

FAMILY_TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=3, num_heads=4, num_classes=10)
FAMILY_IMG = {}  # name -> input side, when not 64 (a family with patch 14 would use 56)


def _timm_class(module: str, name: str):
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{module} is not in the installed timm: {e}")
    cls = getattr(mod, name, None)
    if cls is None:
        import timm

        pytest.skip(f"{module}.{name} is not in the installed timm {timm.__version__}")
    return cls


def _require_options(cls, *options):
    import inspect

    params = inspect.signature(cls.__init__).parameters
    missing = [o for o in options if o not in params]
    if missing:
        import timm

        pytest.skip(f"{cls.__name__} of timm {timm.__version__} has no option(s) {missing}")


def _finish(build):
    torch.manual_seed(0)
    return _perturb(build()).eval()


def _eva(**kw):
    Eva = _timm_class("timm.models.eva", "Eva")
    _require_options(Eva, *kw)
    args = dict(FAMILY_TINY, drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.0)
    args.update(kw)
    return _finish(lambda: Eva(**args))


def _beit(**kw):
    Beit = _timm_class("timm.models.beit", "Beit")
    _require_options(Beit, *kw)
    args = dict(FAMILY_TINY, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0)
    args.update(kw)
    return _finish(lambda: Beit(**args))


def _relpos(**kw):
    RelPos = _timm_class("timm.models.vision_transformer_relpos", "VisionTransformerRelPos")
    _require_options(RelPos, *kw)
    args = dict(FAMILY_TINY, drop_rate=0.0, proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                init_values=0.1)
    args.update(kw)
    return _finish(lambda: RelPos(**args))


def _vit(**kw):
    ViT = _timm_class("timm.models.vision_transformer", "VisionTransformer")
    _require_options(ViT, *kw)
    args = dict(FAMILY_TINY, drop_rate=0.0, pos_drop_rate=0.0, patch_drop_rate=0.0, proj_drop_rate=0.0,
                attn_drop_rate=0.0, drop_path_rate=0.0)
    args.update(kw)
    return _finish(lambda: ViT(**args))


def _naflex(**overrides):
    NaFlexVit = _timm_class("timm.models.naflexvit", "NaFlexVit")
    Cfg = _timm_class("timm.models.naflexvit", "NaFlexVitCfg")
    t = FAMILY_TINY
    # like naflexvit_base_patch16_map: one register token, MAP head (over the patch tokens only)
    kw = dict(patch_size=t["patch_size"], embed_dim=t["embed_dim"], depth=t["depth"], num_heads=t["num_heads"],
              init_values=0.1, global_pool="map", reg_tokens=1, pos_embed_grid_size=(8, 8))
    kw.update(overrides)
    missing = sorted(set(kw) - set(Cfg.__dataclass_fields__))
    if missing:
        import timm

        pytest.skip(f"NaFlexVitCfg of timm {timm.__version__} has no field(s) {missing}")
    cfg = Cfg(**kw)
    return _finish(lambda: NaFlexVit(cfg=cfg, num_classes=t["num_classes"], img_size=t["img_size"]))


def _hf(cls_name: str, cfg_name: str, **kw):
    import transformers  # a dev dependency: a missing one fails the tests rather than skipping them

    cls, cfg_cls = getattr(transformers, cls_name, None), getattr(transformers, cfg_name, None)
    if cls is None or cfg_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {cls_name}")
    t = FAMILY_TINY
    args = dict(image_size=t["img_size"], patch_size=t["patch_size"], hidden_size=t["embed_dim"],
                num_hidden_layers=t["depth"], num_attention_heads=t["num_heads"], num_labels=t["num_classes"],
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    args.update(kw)
    return _finish(lambda: cls(cfg_cls(**args)))


def _dinov2(**kw):
    return _hf("Dinov2ForImageClassification", "Dinov2Config", mlp_ratio=4, layerscale_value=0.1,
               drop_path_rate=0.0, **kw)


FAMILIES: Dict[str, Callable[[], torch.nn.Module]] = {
    # timm EVA: rope + SwiGLU with its norm (separate fc for gate & x) + abs pos + layer scale, [class] head
    "eva_cls": lambda: _eva(class_token=True, global_pool="token", use_rot_pos_emb=True, swiglu_mlp=True,
                            scale_mlp=True, use_abs_pos_emb=True, init_values=0.1),
    # SwiGLU without its norm: eva.py builds the packed GluMlp (one fc1 for gate & x, SiLU, gate_last=False)
    "eva_packed": lambda: _eva(class_token=True, global_pool="token", use_rot_pos_emb=True, swiglu_mlp=True,
                               scale_mlp=False, init_values=0.1),
    # EVA02 classification (eva02_*_patch14_448): q/k/v separate, mlp 4*2/3, avg pool (excl. [class]) + fc_norm
    "eva02_avg": lambda: _eva(class_token=True, global_pool="avg", use_rot_pos_emb=True, swiglu_mlp=True,
                              scale_mlp=True, qkv_fused=False, mlp_ratio=4 * 2 / 3, ref_feat_shape=(8, 8)),
    # PE-core (vit_pe_core_*): AttentionRope blocks, pre-transformer norm, 'xy' rope with offset 1, [class]
    # token kept, MAP head (AttentionPoolLatent, 8 heads) over every token
    "pe_core_map": lambda: _eva(global_pool="map", attn_type="rope", use_pre_transformer_norm=True,
                                use_rot_pos_emb=True, ref_feat_shape=(8, 8), rope_grid_offset=1.0,
                                rope_grid_indexing="xy", attn_pool_num_heads=8, attn_pool_mlp_ratio=4.0),
    # BEiT: per-block relative position bias (an additive sdpa mask), layer scale
    "beit_cls": lambda: _beit(use_abs_pos_emb=False, use_rel_pos_bias=True, global_pool="token", init_values=0.1),
    "beit_avg": lambda: _beit(use_abs_pos_emb=False, use_rel_pos_bias=True, global_pool="avg", init_values=0.1),
    # ViT with relative position (vit_relpos_*_cls: log-coord MLP bias, [class] head)
    "relpos_cls": lambda: _relpos(class_token=True, global_pool="token", rel_pos_type="mlp", qkv_bias=False),
    "relpos_avg": lambda: _relpos(class_token=False, global_pool="avg", rel_pos_type="bias"),
    "relpos_shared": lambda: _relpos(class_token=True, global_pool="token", shared_rel_pos=True),
    # vit_medium_patch16_gap_256-like: no [class] token, average pooling, no fc_norm
    "vit_gap": lambda: _vit(class_token=False, global_pool="avg", fc_norm=False, qkv_bias=False),
    # SigLIP-style: no [class] token, MAP attention-pooling head
    "vit_map": lambda: _vit(class_token=False, global_pool="map"),
    "naflex": _naflex,
    # the [class]-token NaFlexVit: token pooling, its register token kept
    "naflex_cls": lambda: _naflex(global_pool="token", class_token=True),
    "hf_deit": lambda: _hf("DeiTForImageClassification", "DeiTConfig", intermediate_size=192),
    "hf_deit_teacher": lambda: _hf("DeiTForImageClassificationWithTeacher", "DeiTConfig", intermediate_size=192),
    "hf_dinov2": lambda: _dinov2(),
    "hf_dinov2_swiglu": lambda: _dinov2(use_swiglu_ffn=True),
    "hf_dinov2_registers": lambda: _hf("Dinov2WithRegistersForImageClassification", "Dinov2WithRegistersConfig",
                                       mlp_ratio=4, layerscale_value=0.1, drop_path_rate=0.0, num_register_tokens=2),
}


def make_family(name: str):
    """The tiny eval-mode model of family ``name`` (skips the test when the installed library lacks it)."""
    return FAMILIES[name]()


def family_input(name: str, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    s = FAMILY_IMG.get(name, 64)
    return torch.randn(batch, 3, s, s, generator=g)
