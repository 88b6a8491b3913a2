"""Train the small shapes ViT shipped as ``captum_vit/zoo/shapes_vit.pth``.

    python -m tools.train_shapes --out captum_vit/zoo      # from the repository root

The shipped weights come from a chain of runs, each started with ``--init`` from the one before;
``shapes_vit.json`` ("lineage") and ``tools/logs/shapes_vit_train_log.txt`` record every run's
arguments, and ``training_seeds`` in the json lists the dataset seeds of the whole chain (a run
started with ``--init`` inherits the seeds of the weights it starts from), so that evaluation can
stay off them (``captum_vit.zoo.training_seeds()``). See ``docs/shapes_vit_training.md``.

CPU only. Steps:
1. pre-generate a uint8 cache of training images in RAM (``ShapesDataset`` split "single" with
   ``--train-seed`` plus a fraction ``--pairs-frac`` of split "pairs" with the same seed), with a
   multiprocessing pool;
2. train a timm VisionTransformer (config in ``shapes_vit.json``) with AdamW, linear warmup + cosine
   decay, label smoothing, random flips / 90-degree rotations (all label preserving), bf16 autocast;
   with ``--loss softmax`` "pairs" images get the soft target 0.5/0.5 over their two classes, with
   ``--loss bce`` every class is an independent sigmoid (multi-label: both classes of a pair are
   positive), which keeps the logit of one class free of the other's evidence;
   an auxiliary per-patch shape/background loss on the patch tokens (``--aux-weight``; with
   ``--aux-blocks N`` also on the tokens leaving the blocks before the last, "deep token labelling",
   through heads that are not shipped) keeps each token about its own patch; ``--drop-path`` adds
   stochastic depth (training only), which made AGCAM's maps class-specific in the last two runs;
   the schedule advances by ``max(step / steps, elapsed / time budget)`` so the run ends in budget;
3. evaluate top-1 accuracy on ``--val-size`` images of split "single" from the held-out
   ``--val-seed`` (disjoint from the training seed), save fp16 state_dict + json + log;
   ``--spec-every`` monitors AGCAM class-specificity on seed ``--val-seed + 2`` during training.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from captum_vit.data.shapes import CLASSES, generate
from captum_vit.zoo.shapes import DATA_CONFIG, DEFAULT_MODEL_KWARGS, build_shapes_vit, sha256_file

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None


def patch_labels(masks, instance_labels, grid=14, patch=16):
    """Per-patch class (0 = background, 1 + c = shape class c) by majority coverage."""
    cov = np.zeros((len(CLASSES) + 1, grid, grid), np.float32)
    for m, c in zip(masks, instance_labels):
        cov[1 + int(c)] += m.reshape(grid, patch, grid, patch).mean((1, 3))
    cov[0] = 1.0 - cov[1:].sum(0)
    return cov.argmax(0).astype(np.uint8)


def _gen(args):
    seed, split, i, easy = args
    s = generate(seed, split, i, easy=easy)
    lab = s["label"]
    return (s["image_uint8"], (lab, lab) if split == "single" else tuple(lab),
            patch_labels(s["masks"], s["instance_labels"]))


def _parent_training_seeds(init):
    """Training seeds recorded next to the ``--init`` weights (``<stem>.json``); none without a json."""
    if not init:
        return []
    path = os.path.splitext(init)[0] + ".json"
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return [int(s) for s in cfg.get("training_seeds", [cfg.get("dataset", {}).get("train", {}).get("seed", 0)])]


def build_cache(n_single, n_pairs, seed, workers=2, log=print, n_easy_single=0, n_easy_pairs=0):
    t0 = time.time()
    jobs = ([(seed, "single", i, False) for i in range(n_single)] + [(seed, "pairs", i, False) for i in range(n_pairs)]
            + [(seed, "single", i, True) for i in range(n_easy_single)]
            + [(seed, "pairs", i, True) for i in range(n_easy_pairs)])
    n = len(jobs)
    images = torch.empty((n, 224, 224, 3), dtype=torch.uint8)
    labels = torch.empty((n, 2), dtype=torch.int64)
    plabels = torch.empty((n, 14, 14), dtype=torch.uint8)
    with mp.get_context("fork").Pool(workers) as pool:
        it = pool.imap(_gen, jobs, chunksize=64)
        if tqdm is not None:
            it = tqdm(it, total=n, desc="cache", mininterval=5)
        for k, (img, lab, pl) in enumerate(it):
            images[k] = torch.from_numpy(img)
            plabels[k] = torch.from_numpy(pl)
            labels[k, 0], labels[k, 1] = lab
    log(f"cache: {n_single} single + {n_pairs} pairs (+ easy: {n_easy_single} single, {n_easy_pairs} pairs) "
        f"images in {time.time() - t0:.1f}s")
    return images, labels, plabels


MEAN = torch.tensor(DATA_CONFIG["mean"]).view(1, 3, 1, 1)
STD = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)


def to_input(u8):
    """uint8 [B,H,W,3] -> normalised float [B,3,H,W]."""
    return (u8.permute(0, 3, 1, 2).float().div_(255.0) - MEAN) / STD


def augment(x, g, pl=None):
    """Random dihedral transform per sample (label preserving for these shapes); the per-patch
    label map ``pl`` [B, 14, 14] gets the same transform (224 = 14 x 16, so they stay aligned)."""
    b = x.shape[0]
    fh = torch.rand(b, generator=g) < 0.5
    fv = torch.rand(b, generator=g) < 0.5
    tr = torch.rand(b, generator=g) < 0.5
    x = torch.where(fh.view(-1, 1, 1, 1), x.flip(3), x)
    x = torch.where(fv.view(-1, 1, 1, 1), x.flip(2), x)
    x = torch.where(tr.view(-1, 1, 1, 1), x.transpose(2, 3), x)
    if pl is not None:
        pl = torch.where(fh.view(-1, 1, 1), pl.flip(2), pl)
        pl = torch.where(fv.view(-1, 1, 1), pl.flip(1), pl)
        pl = torch.where(tr.view(-1, 1, 1), pl.transpose(1, 2), pl)
        return x.contiguous(), pl.contiguous()
    return x.contiguous()


def soft_targets(labels, nc):
    t = torch.zeros(labels.shape[0], nc)
    t.scatter_add_(1, labels, torch.full(labels.shape, 0.5))
    return t


def fp16_state(model):
    """The model's state_dict with floating-point tensors stored as fp16 (what ships)."""
    return {k: v.detach().half() if torch.is_floating_point(v) else v for k, v in model.state_dict().items()}


def multi_hot(labels, nc):
    """[B, 2] label pairs (a single-class image repeats its label) -> multi-hot [B, nc]."""
    t = torch.zeros(labels.shape[0], nc)
    t.scatter_(1, labels, 1.0)
    return t


def classification_loss(logits, labels, kind, label_smoothing):
    nc = logits.shape[-1]
    if kind == "softmax":
        return F.cross_entropy(logits, soft_targets(labels, nc), label_smoothing=label_smoothing)
    t = multi_hot(labels, nc)
    t = t * (1.0 - label_smoothing) + 0.5 * label_smoothing
    # sum over classes, mean over the batch: the scale of a cross entropy, so lr settings carry over
    return F.binary_cross_entropy_with_logits(logits, t, reduction="sum") / logits.shape[0]


def held_out_batches(seed, split, n, bs):
    """Items 0..n-1 of ``split`` for ``seed`` in batches: yields (items, normalised images [B,3,H,W])."""
    for s in range(0, n, bs):
        items = [generate(seed, split, i) for i in range(s, min(n, s + bs))]
        yield items, to_input(torch.from_numpy(np.stack([it["image_uint8"] for it in items])))


@torch.no_grad()
def evaluate(model, seed, n, split="single", bs=100, bf16=False):
    model.eval()
    correct = 0
    for items, x in held_out_batches(seed, split, n, bs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = model(x).float().argmax(1)
        if split == "single":
            y = torch.tensor([it["label"] for it in items])
            correct += int((pred == y).sum())
        else:
            correct += sum(int(p) in it["label"] for p, it in zip(pred.tolist(), items))
    return correct / n


def class_specificity_rates(model, seed, n=150, bs=50):
    """AGCAM class-specificity on "pairs" images (the rule of ``tests/test_semantics.py``): the
    fraction of images whose map for class a has more mass inside a's masks than inside b's, and
    the same for b. Used only to monitor training, on a seed the tests do not use."""
    from captum_vit import AGCAM
    from captum_vit.metrics import mass_inside

    model.eval()
    agcam = AGCAM(model)
    wins_a, wins_b, count = 0, 0, 0
    for items, x_all in held_out_batches(seed, "pairs", n, bs):
        keep, ma, mb = [], [], []
        for k, it in enumerate(items):
            a_, b_ = it["label"]
            il = it["instance_labels"]
            if (il == a_).any() and (il == b_).any():
                keep.append(k)
                ma.append(torch.from_numpy(it["masks"][il == a_].any(0)))
                mb.append(torch.from_numpy(it["masks"][il == b_].any(0)))
        if not keep:
            continue
        x = x_all[keep]
        ta = torch.tensor([items[k]["label"][0] for k in keep])
        tb = torch.tensor([items[k]["label"][1] for k in keep])
        ma, mb = torch.stack(ma), torch.stack(mb)
        map_a, map_b = agcam.attribute(x, target=ta).detach(), agcam.attribute(x, target=tb).detach()
        wins_a += int((mass_inside(map_a, ma) > mass_inside(map_a, mb)).sum())
        wins_b += int((mass_inside(map_b, mb) > mass_inside(map_b, ma)).sum())
        count += len(keep)
    return wins_a / max(count, 1), wins_b / max(count, 1)


@torch.no_grad()
def evaluate_pairs_top2(model, seed, n, bs=100):
    """Fraction of "pairs" images whose two largest logits are exactly the pair's two classes."""
    model.eval()
    hit = 0
    for items, x in held_out_batches(seed, "pairs", n, bs):
        top2 = model(x).float().topk(2, dim=1).indices.tolist()
        hit += sum(set(t) == set(it["label"]) for t, it in zip(top2, items))
    return hit / n


def _parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--val-seed", type=int, default=12345)
    p.add_argument("--n-train", type=int, default=32000, help="cached training images in total")
    p.add_argument("--pairs-frac", type=float, default=0.2)
    p.add_argument("--easy-frac", type=float, default=0.3,
                   help="fraction of the cache drawn with generate(..., easy=True) (curriculum aid)")
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=40.0, help="time budget for the training loop")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup", type=int, default=250)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--embed-dim", type=int, default=DEFAULT_MODEL_KWARGS["embed_dim"])
    p.add_argument("--depth", type=int, default=DEFAULT_MODEL_KWARGS["depth"])
    p.add_argument("--num-heads", type=int, default=DEFAULT_MODEL_KWARGS["num_heads"])
    p.add_argument("--easy-only-frac", type=float, default=0.15,
                   help="curriculum: the first fraction of the schedule samples easy images only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-bf16", action="store_true", help="train in fp32 instead of bf16 autocast")
    p.add_argument("--eval-every", type=int, default=500)
    p.add_argument("--name", default="shapes_vit")
    p.add_argument("--spec-every", type=int, default=0,
                   help="every N steps log AGCAM class-specificity on 150 pairs images of seed --val-seed + 2 "
                        "and save a snapshot <name>_step<N>.pth (0: off)")
    p.add_argument("--stem", default="conv", choices=["conv", "patch"],
                   help="patch embedding: convolutional stem (default) or timm's linear 16x16 projection")
    p.add_argument("--init", default=None,
                   help="start from these weights (a state_dict .pth) instead of random init; a json with the same "
                        "stem next to it contributes its training_seeds")
    p.add_argument("--log-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "logs"),
                   help="folder of the training log <name>_train_log.txt (default: tools/logs), kept out of --out "
                        "so that the package folder holds only weights and config")
    p.add_argument("--loss", default="softmax", choices=["softmax", "bce"],
                   help="softmax cross entropy (pairs: 0.5/0.5 soft target) or multi-label sigmoid BCE")
    p.add_argument("--aux-weight", type=float, default=0.5,
                   help="weight of an auxiliary per-patch shape/background loss on the patch tokens (a linear "
                        "head used only during training, not shipped); 0 disables it")
    p.add_argument("--aux-blocks", type=int, default=0,
                   help="also apply the per-patch loss (LayerNorm + linear head each, not shipped) to the patch "
                        "tokens leaving each of the last N-1 blocks before the final one (deep token labelling); "
                        "the loss is averaged over the supervised depths")
    p.add_argument("--drop-path", type=float, default=0.0,
                   help="stochastic depth during training (timm's drop_path_rate, linear over the blocks): a "
                        "block's attention or MLP branch is skipped per sample; inactive in eval mode and not "
                        "part of the shipped config")
    return p.parse_args(argv)


def _open_log(a):
    """``(log, file)``: ``log(msg)`` prints a timestamped line and appends it to ``<log-dir>/<name>_train_log.txt``."""
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.log_dir, exist_ok=True)
    log_path = os.path.join(a.log_dir, a.name + "_train_log.txt")
    logf = open(log_path, "w", encoding="utf-8")

    def log(msg):
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        (tqdm.write if tqdm is not None else print)(line)
        logf.write(line + "\n")
        logf.flush()

    return log, logf


def _cache_sizes(a):
    """``(single, pairs, easy single, easy pairs)``: how many images of each kind the training cache holds."""
    n_easy = int(round(a.n_train * a.easy_frac))
    n_hard = a.n_train - n_easy
    n_pairs = int(round(n_hard * a.pairs_frac))
    n_easy_pairs = int(round(n_easy * a.pairs_frac))
    return n_hard - n_pairs, n_pairs, n_easy - n_easy_pairs, n_easy_pairs


@dataclass
class _AuxHeads:
    """The training-only per-patch heads (not shipped): on the last tokens, and on those leaving ``deep_idx``."""

    head: torch.nn.Module
    deep_idx: List[int]
    deep_heads: torch.nn.ModuleList
    deep_out: Dict[int, torch.Tensor]


def _build_model(a, log):
    """``(model, model_kwargs, aux heads)``: the ViT (from ``--init`` if given) and its training-only heads."""
    model_kwargs = dict(DEFAULT_MODEL_KWARGS, embed_dim=a.embed_dim, depth=a.depth, num_heads=a.num_heads,
                        stem=a.stem)
    model = build_shapes_vit(dict(model_kwargs, drop_path_rate=a.drop_path), num_classes=len(CLASSES))
    if a.init:
        model.load_state_dict({k: v.float() for k, v in torch.load(a.init, weights_only=True).items()})
        log(f"initialised from {a.init}")
    aux_head = torch.nn.Linear(a.embed_dim, len(CLASSES) + 1)
    deep_idx = list(range(len(model.blocks) - a.aux_blocks, len(model.blocks) - 1)) if a.aux_blocks > 1 else []
    deep_heads = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(a.embed_dim),
                                                         torch.nn.Linear(a.embed_dim, len(CLASSES) + 1))
                                     for _ in deep_idx)
    deep_out = {}
    for k in deep_idx:
        model.blocks[k].register_forward_hook(lambda m, i, o, k=k: deep_out.__setitem__(k, o))
    log(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {model_kwargs}")
    return model, model_kwargs, _AuxHeads(aux_head, deep_idx, deep_heads, deep_out)


def _optimizer(a, model, aux):
    def decays(name, param):  # no weight decay on biases, norms, position embeddings and tokens
        return param.ndim > 1 and "pos_embed" not in name and "token" not in name

    decay = [p_ for n_, p_ in model.named_parameters() if decays(n_, p_)]
    no_decay = [p_ for n_, p_ in model.named_parameters() if not decays(n_, p_)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": a.weight_decay},
                              {"params": no_decay + list(aux.head.parameters()) + list(aux.deep_heads.parameters()),
                               "weight_decay": 0.0}],
                             lr=a.lr, betas=(0.9, 0.999))


def _lr_at(a, prog, step):
    """Linear warmup over ``--warmup`` steps, then cosine decay from ``--lr`` to ``--min-lr`` over the progress."""
    if step < a.warmup:
        return a.lr * (step + 1) / a.warmup
    return a.min_lr + 0.5 * (a.lr - a.min_lr) * (1 + math.cos(math.pi * min(prog, 1.0)))


@dataclass
class _Run:
    """Where the training loop is: steps and images so far, the epoch's tallies, the schedule's progress."""

    perm: torch.Tensor
    step: int = 0
    seen: int = 0
    epoch: int = 0
    pos: int = 0
    ep_loss: float = 0.0
    ep_correct: int = 0
    ep_count: int = 0
    run_loss: Optional[float] = None
    prog: float = 0.0


def _next_batch(a, r, g, n_hard, n_easy, t_train, log):
    """Cache indices of the next batch: easy images only early in the curriculum, else the epoch's permutation."""
    n = r.perm.shape[0]
    if r.pos + a.batch_size > n:
        r.epoch += 1
        log(f"epoch {r.epoch}: train loss {r.ep_loss / max(r.ep_count, 1):.4f} "
            f"acc {r.ep_correct / max(r.ep_count, 1):.4f} step {r.step} elapsed {time.time() - t_train:.0f}s")
        r.ep_loss, r.ep_correct, r.ep_count = 0.0, 0, 0
        r.perm = torch.randperm(n, generator=g)
        r.pos = 0
    if r.prog < a.easy_only_frac and n_easy > 0:
        return n_hard + torch.randint(0, n_easy, (a.batch_size,), generator=g)
    idx = r.perm[r.pos:r.pos + a.batch_size]
    r.pos += a.batch_size
    return idx


def _train_step(a, model, aux, opt, batch, bf16):
    """One optimiser step on ``batch = (x, patch labels, labels)``; returns ``(loss, logits)``."""
    x, pl, lab = batch
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        feats = model.forward_features(x)
        logits = model.forward_head(feats)
        aux_logits = aux.head(feats[:, model.num_prefix_tokens:]) if a.aux_weight else None
        deep = [hd(aux.deep_out[k][:, model.num_prefix_tokens:]) for k, hd in zip(aux.deep_idx, aux.deep_heads)]
    loss = classification_loss(logits.float(), lab, a.loss, a.label_smoothing)
    if aux_logits is not None:
        aux_losses = [F.cross_entropy(t.float().reshape(-1, t.shape[-1]), pl.reshape(-1))
                      for t in [aux_logits] + deep]
        loss = loss + a.aux_weight * sum(aux_losses) / len(aux_losses)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss, logits


def _tally(r, loss, logits, lab, batch_size):
    """Count a step: the loss's running average, and the epoch's loss and accuracy (a pair counts either class)."""
    r.step += 1
    r.seen += batch_size
    li = float(loss.detach())
    r.run_loss = li if r.run_loss is None else 0.98 * r.run_loss + 0.02 * li
    single = lab[:, 0] == lab[:, 1]
    pred = logits.detach().argmax(1)
    r.ep_loss += li * batch_size
    r.ep_correct += int((pred[single] == lab[single, 0]).sum()) + int(
        ((pred[~single] == lab[~single, 0]) | (pred[~single] == lab[~single, 1])).sum())
    r.ep_count += batch_size


def _monitor(a, model, r, lr, elapsed, bf16, log):
    """The periodic log line, quick accuracy checks and (``--spec-every``) class-specificity snapshots."""
    step = r.step
    if step % 50 == 0:
        log(f"step {step} loss(ema) {r.run_loss:.4f} lr {lr:.2e} img/s {r.seen / elapsed:.1f} prog {r.prog:.3f}")
    if a.eval_every and step % a.eval_every == 0:
        acc = evaluate(model, a.val_seed + 1, 200, bf16=bf16)  # quick check on a *different* seed
        model.train()
        log(f"step {step}: quick acc (200 imgs, seed {a.val_seed + 1}) {acc:.3f}")
    if a.spec_every and step % a.spec_every == 0:
        ra, rb = class_specificity_rates(model, a.val_seed + 2)
        acc = evaluate(model, a.val_seed + 1, 200, bf16=bf16)
        model.train()
        torch.save(fp16_state(model), os.path.join(a.out, f"{a.name}_step{step}.pth"))
        log(f"step {step}: AGCAM class-specificity (150 pairs, seed {a.val_seed + 2}) {ra:.3f} / {rb:.3f}, "
            f"quick acc (200 imgs, seed {a.val_seed + 1}) {acc:.3f}; snapshot saved")


def _train(a, model, aux, opt, cache, counts, bf16, log):
    """The training loop until the schedule's progress (steps or time budget, whichever is further) reaches 1.

    ``cache``: ``(images, labels, patch labels)``; ``counts``: ``(n_hard, n_easy)``, the hard images come first.
    Returns ``(run, training time in s)``.
    """
    images, labels, plabels = cache
    n = images.shape[0]
    n_hard, n_easy = counts
    g = torch.Generator().manual_seed(a.train_seed)
    budget = a.minutes * 60.0
    t_train = time.time()
    r = _Run(perm=torch.randperm(n, generator=g))
    pbar = tqdm(total=a.steps, desc="train", mininterval=10) if tqdm is not None else None
    model.train()
    while r.prog < 1.0:
        idx = _next_batch(a, r, g, n_hard, n_easy, t_train, log)
        x, pl = augment(to_input(images[idx]), g, plabels[idx].long())
        lab = labels[idx]
        lr = _lr_at(a, r.prog, r.step)
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss, logits = _train_step(a, model, aux, opt, (x, pl, lab), bf16)
        _tally(r, loss, logits, lab, x.shape[0])
        elapsed = time.time() - t_train
        r.prog = max(r.step / a.steps, elapsed / budget)
        if pbar is not None:
            pbar.update(1)
            pbar.set_postfix(loss=f"{r.run_loss:.3f}", lr=f"{lr:.2e}", ips=f"{r.seen / elapsed:.1f}", refresh=False)
        _monitor(a, model, r, lr, elapsed, bf16, log)
    if pbar is not None:
        pbar.close()
    train_time = time.time() - t_train
    if r.ep_count:
        log(f"epoch {r.epoch + 1} (partial): train loss {r.ep_loss / r.ep_count:.4f} "
            f"acc {r.ep_correct / r.ep_count:.4f}")
    log(f"training: {r.step} steps, {r.seen} images, {train_time:.0f}s, {r.seen / train_time:.1f} img/s, "
        f"final loss(ema) {r.run_loss:.4f}")
    return r, train_time


def _held_out(a, model, log):
    """``(accuracy, pairs top-1-in-pair, pairs top-2 == pair)`` on the held-out ``--val-seed``."""
    model.eval()
    acc = evaluate(model, a.val_seed, a.val_size, bf16=False)
    acc_pairs = evaluate(model, a.val_seed, min(a.val_size, 500), split="pairs", bf16=False)
    log(f"held-out accuracy (split single, seed {a.val_seed}, first {a.val_size} images): {acc:.4f}")
    acc_top2 = evaluate_pairs_top2(model, a.val_seed, min(a.val_size, 500))
    log(f"held-out pairs top-1-in-pair (seed {a.val_seed}, {min(a.val_size, 500)} images): {acc_pairs:.4f}")
    log(f"held-out pairs top-2 == pair (seed {a.val_seed}, {min(a.val_size, 500)} images): {acc_top2:.4f}")
    return acc, acc_pairs, acc_top2


def _save_weights(a, model, model_kwargs, log):
    """Save the fp16 state_dict; returns ``(path, held-out accuracy of the saved weights)``."""
    wpath = os.path.join(a.out, a.name + ".pth")
    torch.save(fp16_state(model), wpath)
    # the accuracy of the fp16-rounded weights is what ships: re-evaluate them
    from captum_vit.zoo.shapes import build_shapes_vit as _b
    m2 = _b(model_kwargs, num_classes=len(CLASSES))
    m2.load_state_dict({k: v.float() for k, v in torch.load(wpath, weights_only=True).items()})
    acc16 = evaluate(m2.eval(), a.val_seed, a.val_size, bf16=False)
    log(f"held-out accuracy of the saved fp16 weights (fp32 compute): {acc16:.4f}")
    return wpath, acc16


def _config(a, model_kwargs, sizes, training_seeds, r, times, accuracies, wpath):
    """The shipped json: architecture, classes, data, the run's arguments and results, the weights' digest.

    ``sizes``: :func:`_cache_sizes`; ``times``: ``(start of the script, training time in s)``;
    ``accuracies``: ``(fp16 weights, fp32 before fp16, pairs top-1-in-pair, pairs top-2 == pair)``.
    """
    n_single, n_pairs, n_easy_single, n_easy_pairs = sizes
    t_start, train_time = times
    acc16, acc, acc_pairs, acc_top2 = accuracies
    bf16 = not a.no_bf16
    return {
        "name": a.name,
        "arch": "timm.models.vision_transformer.VisionTransformer",
        "model_kwargs": dict(model_kwargs, num_classes=len(CLASSES)),
        "classes": list(CLASSES),
        "data_config": DATA_CONFIG,
        "dataset": {"class": "captum_vit.data.ShapesDataset", "image_size": 224,
                    "train": {"seed": a.train_seed, "single": n_single, "pairs": n_pairs,
                              "easy_single": n_easy_single, "easy_pairs": n_easy_pairs,
                              "note": "items 0..N-1 of each split; easy = generate(..., easy=True)"},
                    "val": {"seed": a.val_seed, "split": "single", "size": a.val_size}},
        "training_seeds": training_seeds,
        "training": {"steps": r.step, "images_seen": r.seen, "batch_size": a.batch_size, "lr": a.lr,
                     "min_lr": a.min_lr, "weight_decay": a.weight_decay, "warmup": a.warmup,
                     "label_smoothing": a.label_smoothing, "bf16_autocast": bf16, "seed": a.train_seed,
                     "augment": "random hflip/vflip/transpose", "loss": a.loss,
                     "drop_path": a.drop_path,
                     "pairs_target": "0.5/0.5 soft target" if a.loss == "softmax" else "multi-hot (both classes)",
                     "curriculum": f"easy images only for the first {a.easy_only_frac:.0%} of the schedule",
                     "wall_time_s": round(time.time() - t_start, 1), "train_time_s": round(train_time, 1),
                     "images_per_s": round(r.seen / train_time, 1), "final_train_loss_ema": round(r.run_loss, 4),
                     "torch": torch.__version__},
        "heldout_accuracy": acc16,
        "heldout_accuracy_fp32_before_fp16": acc,
        "heldout_pairs_top1_in_pair": acc_pairs,
        "heldout_pairs_top2_is_pair": acc_top2,
        "weights": os.path.basename(wpath),
        "weights_dtype": "float16",
        "sha256": sha256_file(wpath),
    }


def main(argv=None):
    a = _parse_args(argv)
    log, logf = _open_log(a)
    t_start = time.time()
    torch.manual_seed(a.train_seed)
    np.random.seed(a.train_seed)
    torch.set_num_threads(a.threads)
    bf16 = not a.no_bf16
    log(f"args: {vars(a)}")
    log(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {a.threads}")

    sizes = _cache_sizes(a)
    n_single, n_pairs, n_easy_single, n_easy_pairs = sizes
    cache = build_cache(n_single, n_pairs, a.train_seed, a.workers, log, n_easy_single, n_easy_pairs)
    model, model_kwargs, aux = _build_model(a, log)
    training_seeds = sorted({a.train_seed} | set(_parent_training_seeds(a.init)))
    opt = _optimizer(a, model, aux)
    counts = (n_single + n_pairs, n_easy_single + n_easy_pairs)
    r, train_time = _train(a, model, aux, opt, cache, counts, bf16, log)
    acc, acc_pairs, acc_top2 = _held_out(a, model, log)
    wpath, acc16 = _save_weights(a, model, model_kwargs, log)
    cfg = _config(a, model_kwargs, sizes, training_seeds, r, (t_start, train_time), (acc16, acc, acc_pairs, acc_top2),
                  wpath)
    with open(os.path.join(a.out, a.name + ".json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    log(f"saved {wpath} ({os.path.getsize(wpath) / 1e6:.2f} MB), total wall time {time.time() - t_start:.0f}s")
    logf.close()
    return cfg


if __name__ == "__main__":
    main()
