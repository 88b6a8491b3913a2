"""Independent references for the baseline methods, written from their published definitions.

Written straight from the published definitions and the authors' public code (read for facts,
not copied), sharing no code with ``captum_vit``. Every function works ONE IMAGE AT A TIME, writes
the attention out by hand (unfused) and only calls the model's own sub-modules (norms, linears,
activations, layer scales, patch embedding). Each returns ``[B, gh*gw]``: the [class] row
(query 0) over the patch keys, the ``P`` prefix tokens (timm ``model.num_prefix_tokens``;
1 for Hugging Face ViT, 2 for Hugging Face DeiT: [class] + distillation) dropped from the key axis.

* :func:`rollout` -- Abnar & Zuidema 2020 as in jacobgil/vit-explain ``vit_rollout.py``.
* :func:`raw_attention` -- last layer, mean over heads.
* :func:`gae` -- Chefer et al. ICCV 2021 generic rule (Transformer-MM-Explainability).
* :func:`transformer_attribution` -- Chefer et al. CVPR 2021, the LRP of
  Transformer-Explainability ``ViT_LRP.py`` + ``layers_ours.py`` with alpha=1 (beta=0), every rule
  implemented as in ``layers_ours``: a recomputed forward of the layer on detached inputs and
  ``torch.autograd.grad`` ("gradprop").
* :func:`cdam` (+ smooth / integrated variants) -- Brocki & Chung 2023, as in obzai/CDAM
  ``maps.py``.

Resolved ambiguities (see the docstrings for the details):

* rollout: vit-explain writes ``a / a.sum(dim=-1)`` on a ``[1, N, N]`` tensor, which broadcasts
  the sum of row j over column j; the published rule renormalises rows, so the reference divides each row
  by its own sum (identical for mean fusion without discard, whose rows already sum to 1).
  The discard zeroes the ``int(N*N*ratio)`` smallest fused entries except flat index 0 (the
  [class]->[class] entry), exactly as vit-explain (so one fewer is zeroed when index 0 is among
  the smallest); it is not the whole [class] column that is protected.
* LRP: q/k norms (qk_norm) and LayerScale pass relevance through unchanged, by analogy with the
  LayerNorm rule (and with the attention ``* scale`` that is no layer). Only [class]-token pooling
  is covered (not the distilled model's two-head average).
* Integrated CDAM (obzai ``concept_map_intgrad``): the LAST BLOCK'S INPUT X is scaled,
  ``X_k = (k/M) X`` for ``k = 0..M-1`` (left Riemann points, zero baseline); at each step the
  score is ``sum_j T_k * dy/dT_k`` with ``T_k = norm1(X_k)`` (the tokens at that step; the
  subtracted baseline is the zero block input, so nothing is subtracted); the map is the mean
  over ``k = 1..M-1`` (the k=0 map is computed and dropped, so it divides by M-1).
* Smooth CDAM (``concept_map_smoothgrad``): ``X_s = X + std * eps_s`` on every token (prefix
  tokens too), ``std = noise_level * (max(X) - min(X))`` over the whole image's block input; the
  map is the mean over the samples of ``sum_j T_s * dy/dT_s``, ``T_s = norm1(X_s)``.
"""

import copy

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------- model anatomy


def _is_timm(model):
    return hasattr(model, "patch_embed")


class _Block:
    """Uniform view on one pre-norm block (timm ``Block`` or HF ``ViTLayer``)."""

    def __init__(self, blk, timm):
        self.timm = timm
        if timm:
            at = blk.attn
            self.norm1, self.norm2 = blk.norm1, blk.norm2
            self.qkv_w, self.qkv_b = at.qkv.weight, at.qkv.bias
            self.q_norm, self.k_norm = at.q_norm, at.k_norm
            self.attn_norm = at.norm
            self.heads, self.hd = at.num_heads, at.head_dim
            self.proj = at.proj
            self.ls1, self.ls2 = blk.ls1, blk.ls2
            self.fc1, self.act, self.fc2 = blk.mlp.fc1, blk.mlp.act, blk.mlp.fc2
            self.mlp_norm = blk.mlp.norm
        else:
            at = blk.attention
            ident = torch.nn.Identity()
            self.norm1, self.norm2 = blk.layernorm_before, blk.layernorm_after
            lins = (at.q_proj, at.k_proj, at.v_proj)
            self.qkv_w = torch.cat([m.weight for m in lins])
            self.qkv_b = None if lins[0].bias is None else torch.cat([m.bias for m in lins])
            self.q_norm = self.k_norm = self.attn_norm = ident
            self.hd = at.head_dim
            self.heads = self.qkv_w.shape[1] // self.hd
            self.proj = at.o_proj
            self.ls1 = self.ls2 = ident
            self.fc1, self.act, self.fc2 = blk.mlp.fc1, blk.mlp.activation_fn, blk.mlp.fc2
            self.mlp_norm = ident

    def attention(self, n1):
        """Hand-written attention on the normed tokens: returns (attention output, record)."""
        B, N, D = n1.shape
        qkv = F.linear(n1, self.qkv_w, self.qkv_b)  # [B, N, (3 H hd)]
        qkv = qkv.reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        q, k, v = self.q_norm(qkv[0]), self.k_norm(qkv[1]), qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.hd ** -0.5, dim=-1)
        ctx = self.attn_norm((attn @ v).transpose(1, 2).reshape(B, N, D))
        out = self.ls1(self.proj(ctx))
        return out, {"q": q, "k": k, "v": v, "attn": attn, "ctx": ctx}

    def mlp(self, n2):
        g = self.mlp_norm(self.act(self.fc1(n2)))
        return self.ls2(self.fc2(g)), g

    def forward(self, h):
        n1 = self.norm1(h)
        a_out, rec = self.attention(n1)
        h2 = h + a_out
        n2 = self.norm2(h2)
        m, g = self.mlp(n2)
        rec.update(h=h, n1=n1, a_out=a_out, h2=h2, n2=n2, g=g, m=m)
        return h2 + m, rec


def _hf_base(model):
    """The encoder of a Hugging Face classifier (``model.vit``, ``model.deit``)."""
    return getattr(model, model.base_model_prefix)


def _anatomy(model):
    timm = _is_timm(model)
    blocks = model.blocks if timm else _hf_base(model).layers
    P = model.num_prefix_tokens if timm else (2 if model.config.model_type == "deit" else 1)
    return timm, [_Block(b, timm) for b in blocks], P


def _tokens(model, x):
    """Tokens entering block 0."""
    if _is_timm(model):
        h = model._pos_embed(model.patch_embed(x))
        return model.norm_pre(model.patch_drop(h))
    return _hf_base(model).embeddings(x)


def _final_norm(model):
    return model.norm if _is_timm(model) else _hf_base(model).layernorm


def _logits_from_normed(model, z):
    return model.forward_head(z) if _is_timm(model) else model.classifier(z[:, 0])


def _embedding_from_normed(model, z):
    """The [class] embedding with the head removed (timm pre-logits; HF final norm at token 0)."""
    return model.forward_head(z, pre_logits=True) if _is_timm(model) else z[:, 0]


def _forward(model, x, final_norm=None):
    """Logits [1, C] and the per-block records; ``final_norm`` overrides the model's final norm."""
    _, blocks, P = _anatomy(model)
    h = _tokens(model, x)
    recs = []
    for b in blocks:
        h, rec = b.forward(h)
        recs.append(rec)
    z = (final_norm or _final_norm(model))(h)
    return _logits_from_normed(model, z), recs, P, z


def _private(model):
    m = copy.deepcopy(model).eval()
    for p in m.parameters():
        p.requires_grad_(True)
    return m


def logits_reference(model, images):
    with torch.no_grad():
        return torch.cat([_forward(model, images[i : i + 1])[0] for i in range(images.shape[0])])


# ----------------------------------------------------------------------------- attention maps


def _fuse(attn, head_fusion):
    if head_fusion == "mean":
        return attn.mean(0)
    if head_fusion == "max":
        return attn.max(0).values
    if head_fusion == "min":
        return attn.min(0).values
    raise ValueError(head_fusion)


def rollout(model, x, head_fusion="mean", discard_ratio=0.0):
    """Attention rollout: ``R = a_L ... a_1`` with ``a = rownorm((fuse_h A + I) / 2)``; raw R[0, P:]."""
    maps = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            _, recs, P, _ = _forward(model, x[i : i + 1])
            N = recs[0]["attn"].shape[-1]
            eye = torch.eye(N, dtype=recs[0]["attn"].dtype)
            R = eye.clone()
            for rec in recs:
                a = _fuse(rec["attn"][0], head_fusion).clone()  # [N, N]
                flat = a.view(-1)
                n_drop = int(flat.numel() * discard_ratio)
                if n_drop > 0:
                    idx = torch.topk(flat, n_drop, largest=False).indices
                    flat[idx[idx != 0]] = 0
                a = (a + eye) / 2
                a = a / a.sum(-1, keepdim=True)
                R = a @ R
            maps.append(R[0, P:])
    return torch.stack(maps)


def raw_attention(model, x):
    maps = []
    with torch.no_grad():
        for i in range(x.shape[0]):
            _, recs, P, _ = _forward(model, x[i : i + 1])
            maps.append(recs[-1]["attn"][0].mean(0)[0, P:])
    return torch.stack(maps)


def gae(model, x, targets):
    """Chefer ICCV 2021: R = I; R += mean_h((dy/dA * A)^+) @ R per block in order."""
    model = _private(model)
    maps = []
    for i in range(x.shape[0]):
        logits, recs, P, _ = _forward(model, x[i : i + 1])
        A = [r["attn"] for r in recs]
        G = torch.autograd.grad(logits[0, int(targets[i])], A)
        N = A[0].shape[-1]
        R = torch.eye(N, dtype=A[0].dtype)
        for a, g in zip(A, G):
            cam = (g[0] * a[0]).clamp(min=0).mean(0)
            R = R + cam @ R
        maps.append(R[0, P:].detach())
    return torch.stack(maps)


# ----------------------------------------------------------------------------- LRP (Chefer CVPR 2021)


def safe_divide(a, b):
    """layers_ours.safe_divide: a / (b + 1e-9) where b != 0 (with a guard when that sum is 0)."""
    den = b.clamp(min=1e-9) + b.clamp(max=1e-9)
    den = den + den.eq(0).type(den.type()) * 1e-9
    return a / den * b.ne(0).type(b.type())


def _leaf(t):
    return t.detach().requires_grad_(True)


def _rp_linear(R, X, W):
    """Linear.relprop, alpha=1 beta=0, no bias: z+ split of weights and inputs, via gradprop."""
    X = _leaf(X)
    W = W.detach()
    pw, nw = W.clamp(min=0), W.clamp(max=0)
    px, nx = X.clamp(min=0), X.clamp(max=0)
    Z1, Z2 = F.linear(px, pw), F.linear(nx, nw)
    S = safe_divide(R, Z1 + Z2)
    C1 = px * torch.autograd.grad(Z1, px, S)[0]
    C2 = nx * torch.autograd.grad(Z2, nx, S)[0]
    return (C1 + C2).detach()


def _rp_simple(fn, R, *Xs):
    """RelPropSimple: X_i * grad(Z, X_i, R / Z)."""
    Xs = [_leaf(X) for X in Xs]
    Z = fn(*Xs)
    C = torch.autograd.grad(Z, Xs, safe_divide(R, Z))
    return [(X * c).detach() for X, c in zip(Xs, C)]


def _rp_add(R, X0, X1):
    """Add.relprop: X*grad shares, rescaled so each branch gets its |sum| share of sum(R)."""
    a, b = _rp_simple(lambda u, v: u + v, R, X0, X1)
    a_sum, b_sum = a.sum(), b.sum()
    a_fact = safe_divide(a_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    b_fact = safe_divide(b_sum.abs(), a_sum.abs() + b_sum.abs()) * R.sum()
    return a * safe_divide(a_fact, a.sum()), b * safe_divide(b_fact, b.sum())


def _rp_clone(R0, R1, X):
    """Clone.relprop: X * grad([X, X], X, [R0/X, R1/X])."""
    X = _leaf(X)
    C = torch.autograd.grad([X, X], X, [safe_divide(R0, X), safe_divide(R1, X)])[0]
    return (X * C).detach()


def _rp_block(b, rec, R):
    """Block.relprop of ViT_LRP; returns (relevance at the block input, relevance of A)."""
    R_h2a, R_m = _rp_add(R, rec["h2"], rec["m"])
    R_g = _rp_linear(R_m, rec["g"], b.fc2.weight)  # ls2, dropout: pass
    R_n2 = _rp_linear(R_g, rec["n2"], b.fc1.weight)  # GELU: pass
    R_h2 = _rp_clone(R_h2a, R_n2, rec["h2"])  # norm2: pass
    R_ha, R_a = _rp_add(R_h2, rec["h"], rec["a_out"])
    R_ctx = _rp_linear(R_a, rec["ctx"], b.proj.weight)  # ls1, proj_drop: pass
    _, N, D = R_ctx.shape
    R_ctx = R_ctx.reshape(1, N, b.heads, b.hd).transpose(1, 2)
    cam_attn, cam_v = _rp_simple(lambda a, v: a @ v, R_ctx, rec["attn"], rec["v"])
    cam_attn, cam_v = cam_attn / 2, cam_v / 2
    # softmax, attn_drop: pass; the "* scale" is no layer
    cam_q, cam_k = _rp_simple(lambda q, k: q @ k.transpose(-2, -1), cam_attn, rec["q"], rec["k"])
    cam_q, cam_k = cam_q / 2, cam_k / 2
    # q_norm / k_norm: pass (as LayerNorm)
    R_qkv = torch.stack([cam_q, cam_k, cam_v]).permute(1, 3, 0, 2, 4).reshape(1, N, 3 * D)
    R_n1 = _rp_linear(R_qkv, rec["n1"], b.qkv_w)
    R_h = _rp_clone(R_ha, R_n1, rec["h"])  # norm1: pass
    return R_h, cam_attn


def _check_lrp_supported(model):
    if _is_timm(model):
        if model.global_pool != "token" or not isinstance(model.fc_norm, torch.nn.Identity):
            raise NotImplementedError("reference LRP covers [class]-token pooling only")
        if hasattr(model, "head_dist"):
            raise NotImplementedError("reference LRP does not cover the distilled two-head average")
        for blk in model.blocks:
            if type(blk).__name__ != "Block" or not isinstance(blk.attn.norm, torch.nn.Identity):
                raise NotImplementedError(type(blk).__name__)
    elif not isinstance(getattr(model, "classifier", None), torch.nn.Linear):
        raise NotImplementedError(f"reference LRP covers one linear head on [class] only, not {type(model).__name__}")


def transformer_attribution(model, x, targets, start_layer=0, final_norm_eps=1e-5):
    """Chefer CVPR 2021 "Transformer Attribution" (ViT_LRP ``method="grad"``)."""
    _check_lrp_supported(model)
    model = _private(model)
    timm, blocks, P = _anatomy(model)
    fn = _final_norm(model)
    def final_norm(h):  # the model's final-norm weights, Chefer's eps (ViT_LRP: nn.LayerNorm default 1e-5)
        if final_norm_eps is None:
            return fn(h)
        return F.layer_norm(h, fn.normalized_shape, fn.weight, fn.bias, final_norm_eps)

    head = model.head if timm else model.classifier
    maps = []
    for i in range(x.shape[0]):
        logits, recs, P, z = _forward(model, x[i : i + 1], final_norm)
        t = int(targets[i])
        A = [r["attn"] for r in recs]
        G = torch.autograd.grad(logits[0, t], A)
        # relevance, starting from the one-hot vector (not the logit value)
        R = F.one_hot(torch.tensor([t]), logits.shape[-1]).to(z.dtype)
        pooled = z[:, 0]
        R = _rp_linear(R, pooled, head.weight)  # [1, D]
        R = _rp_simple(lambda u: torch.index_select(u, 1, torch.tensor(0)), R.unsqueeze(1), z)[0]
        # final norm: pass
        cams = [None] * len(blocks)
        for j in reversed(range(len(blocks))):
            R, cams[j] = _rp_block(blocks[j], recs[j], R)
        N = A[0].shape[-1]
        eye = torch.eye(N, dtype=recs[0]["attn"].dtype)
        layer = [eye + (G[j][0] * cams[j][0]).clamp(min=0).mean(0) for j in range(len(blocks))]
        C = layer[start_layer]
        for j in range(start_layer + 1, len(blocks)):
            C = layer[j] @ C
        maps.append(C[0, P:].detach())
    return torch.stack(maps)


# ----------------------------------------------------------------------------- CDAM (Brocki & Chung)


def _to_last_block(model, x):
    """Input of the last block, and everything needed to run the tail."""
    _, blocks, P = _anatomy(model)
    h = _tokens(model, x)
    for b in blocks[:-1]:
        h, _ = b.forward(h)
    return h, blocks[-1], P


def _tail(model, last, X, T):
    """Run the last block from its input X with T = norm1(X) injected as the attention input."""
    a_out, _ = last.attention(T)
    h2 = X + a_out
    h3 = h2 + last.mlp(last.norm2(h2))[0]
    z = _final_norm(model)(h3)
    return _logits_from_normed(model, z), _embedding_from_normed(model, z)


def class_embedding(model, images):
    """[M, D] class embeddings (head removed), per image."""
    out = []
    with torch.no_grad():
        for i in range(images.shape[0]):
            _, _, _, z = _forward(model, images[i : i + 1])
            out.append(_embedding_from_normed(model, z))
    return torch.cat(out)


def _score(logits, emb, target, concept, fn):
    if fn is not None:
        return fn(emb).reshape(())
    if concept is not None:
        return (emb[0] * concept).sum()
    return logits[0, int(target)]


def _cdam_at(model, last, X, P, target, concept, fn):
    T = last.norm1(X)
    logits, emb = _tail(model, last, X, T)
    y = _score(logits, emb, target, concept, fn)
    g = torch.autograd.grad(y, T)[0]
    return (T * g)[0, P:].sum(-1).detach()


def cdam(model, x, targets=None, concept=None, fn=None):
    """``S_i = sum_j T_ij dy/dT_ij`` for patch tokens i, T = last block's norm1 output. Signed."""
    model = _private(model)
    concept = None if concept is None else concept.detach()
    maps = []
    for i in range(x.shape[0]):
        X, last, P = _to_last_block(model, x[i : i + 1])
        maps.append(_cdam_at(model, last, X, P, None if targets is None else targets[i], concept, fn))
    return torch.stack(maps)


def smooth_cdam(model, x, targets, noise, noise_level=0.05):
    """Mean over samples s of CDAM at ``X + noise_level*(max X - min X) * noise[s, i]``."""
    model = _private(model)
    maps = []
    for i in range(x.shape[0]):
        X, last, P = _to_last_block(model, x[i : i + 1])
        X = X.detach()
        std = noise_level * (X.max() - X.min())
        per = [_cdam_at(model, last, X + std * noise[s, i : i + 1], P, targets[i], None, None)
               for s in range(noise.shape[0])]
        maps.append(torch.stack(per).mean(0))
    return torch.stack(maps)


def integrated_cdam(model, x, targets, n_steps=50):
    """Mean over k = 1..M-1 of CDAM at the scaled block input ``(k/M) X`` (obzai/CDAM)."""
    model = _private(model)
    maps = []
    for i in range(x.shape[0]):
        X, last, P = _to_last_block(model, x[i : i + 1])
        X = X.detach()
        per = [_cdam_at(model, last, (k / n_steps) * X, P, targets[i], None, None)
               for k in range(1, n_steps)]
        maps.append(torch.stack(per).mean(0))
    return torch.stack(maps)
