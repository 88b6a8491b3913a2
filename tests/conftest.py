"""Tiny ViT variants shared by the tests (random init, CPU, fast)."""

import os
import sys

import torch

# tools/ (training recipes) is not installed with the package; its tests import it from the repository root.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
