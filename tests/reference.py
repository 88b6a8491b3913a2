"""Independent AGCAM reference written straight from the method's definition.

One image at a time, unfused attention written out by hand, every attention input detached,
``torch.autograd.grad`` of the target logit w.r.t. the post-softmax attention. It shares no
code with ``captum_vit``: it calls the model's own sub-modules (norms, linears, MLPs) only.
"""

import copy

import torch


def _timm_tokens_and_blocks(model, x):
    h = model.patch_embed(x)
    h = model._pos_embed(h)
    h = model.norm_pre(model.patch_drop(h))
    return h


def _attn_timm(at, h, detach):
    if detach:
        h = h.detach()
    B, N, _ = h.shape
    qkv = at.qkv(h).reshape(B, N, 3, at.num_heads, at.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = at.q_norm(q), at.k_norm(k)
    scores = (q @ k.transpose(-2, -1)) * at.head_dim ** -0.5
    attn = torch.softmax(scores, dim=-1)
    o = (attn @ v).transpose(1, 2).reshape(B, N, -1)
    o = at.proj(getattr(at, "norm", torch.nn.Identity())(o))
    return o, scores, attn


def _attn_hf(at, h, detach):
    if detach:
        h = h.detach()
    B, N, _ = h.shape
    split = lambda t: t.reshape(B, N, -1, at.head_dim).transpose(1, 2)  # noqa: E731
    q, k, v = split(at.q_proj(h)), split(at.k_proj(h)), split(at.v_proj(h))
    scores = (q @ k.transpose(-2, -1)) * at.head_dim ** -0.5
    attn = torch.softmax(scores, dim=-1)
    o = at.o_proj((attn @ v).transpose(1, 2).reshape(B, N, -1))
    return o, scores, attn


def forward_recording(model, x, detach=True):
    """Logits ``[1, C]`` plus per-block scaled pre-softmax scores and post-softmax attention."""
    S, A = [], []
    if hasattr(model, "patch_embed"):  # timm
        h = _timm_tokens_and_blocks(model, x)
        post_norm = type(model.blocks[0]).__name__ == "ResPostBlock"
        for blk in model.blocks:
            if post_norm:  # x + norm1(attn(x)), then x + norm2(mlp(x))
                o, s, a = _attn_timm(blk.attn, h, detach)
                h = h + blk.norm1(o)
                h = h + blk.norm2(blk.mlp(h))
            else:
                o, s, a = _attn_timm(blk.attn, blk.norm1(h), detach)
                h = h + blk.ls1(o)
                h = h + blk.ls2(blk.mlp(blk.norm2(h)))
            S.append(s)
            A.append(a)
        out = model.forward_head(model.norm(h))
        P = model.num_prefix_tokens
    else:  # Hugging Face ViTForImageClassification
        h = model.vit.embeddings(x)
        for layer in model.vit.layers:
            o, s, a = _attn_hf(layer.attention, layer.layernorm_before(h), detach)
            h = h + o
            h = h + layer.mlp(layer.layernorm_after(h))
            S.append(s)
            A.append(a)
        out = model.classifier(model.vit.layernorm(h)[:, 0])
        P = 1
    return out, S, A, P


def agcam_reference(model, images, targets, detach=True, layers=None):
    """``[B, gh*gw]`` AGCAM maps, one image at a time; sum over heads, then layers."""
    model = copy.deepcopy(model)
    for p in model.parameters():  # so that A has a graph even when inputs are detached
        p.requires_grad_(True)
    maps = []
    for i in range(images.shape[0]):
        x = images[i : i + 1].clone().requires_grad_(not detach)
        logits, S, A, P = forward_recording(model, x, detach)
        y = logits[0, int(targets[i])]
        G = torch.autograd.grad(y, A)
        ks = range(len(A)) if layers is None else layers
        m = sum(
            (torch.sigmoid(S[k][0, :, 0, P:]) * torch.relu(G[k][0, :, 0, P:])).sum(0) for k in ks
        )
        maps.append(m.detach())
    return torch.stack(maps)


def logits_reference(model, images):
    with torch.no_grad():
        return torch.cat([forward_recording(model, images[i : i + 1])[0] for i in range(images.shape[0])])
