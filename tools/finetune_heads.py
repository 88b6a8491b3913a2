"""Fine-tune a ViT classifier for PASCAL VOC (20 classes, single-label) or CUB-200-2011 (200 classes).

    python -m tools.finetune_heads --dataset voc --root /data/VOCdevkit --pretrained --out runs/voc
    python -m tools.finetune_heads --dataset cub --root /data/CUB_200_2011 --pretrained --out runs/cub

These are the two heads the localization benchmarks explain on VOC and CUB: a ViT-B/16 (timm
``vit_base_patch16_224.orig_in21k_ft_in1k`` by default) whose ImageNet head is replaced by one with
the dataset's number of classes (``model.reset_classifier(n)``), then trained on the dataset's
train split and evaluated on its held-out split after every epoch:

- VOC: ``ImageSets/Main/train.txt`` for training, ``val.txt`` for evaluation, single-class images
  only (:class:`captum_vit.data.VOCSingleClass`), so that one label per image is well defined;
- CUB: images with flag 1 in ``train_test_split.txt`` for training, flag 0 for evaluation
  (:class:`captum_vit.data.CUBTest` with ``split="train"`` / ``"test"``).

Preprocessing is the one the explanations are evaluated with (squash resize to ``--img-size``,
mean = std = 0.5), so the head sees at training time exactly the inputs it is explained on; the only
augmentation is a random horizontal flip, which preserves the label of every class of both
datasets. AdamW, per-step cosine decay (optional linear warmup), optional label smoothing,
``--freeze-backbone`` trains the head alone. ``--max-steps`` caps the run (smoke tests).

Weights: ``--pretrained`` downloads timm's weights for ``--model``; ``--checkpoint FILE`` loads a
state dict instead (its ``head.*`` entries are ignored: the head is replaced anyway); with neither,
the model starts from random init (tests).

Outputs in ``--out``: ``model.pth`` (fp32 state dict, loadable with ``torch.load(...,
weights_only=True)`` into ``timm.create_model(model, num_classes=n, img_size=...)``), ``model.json``
(arguments, class names, per-epoch and final train/val accuracy, per-step losses, the data
fingerprint) and ``train_log.txt``. The data fingerprint is a sha256 over the sorted
``split, image path relative to the dataset folder, label`` lines of both splits: two runs with the
same fingerprint saw the same images with the same labels (image bytes are not hashed, which would
cost a full pass over the data).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import time
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn.functional as F

from captum_vit.data import CUBTest, VOCSingleClass, collate_annotated
from captum_vit.data.boxes import AnnotatedImageDataset

DEFAULT_MODEL = "vit_base_patch16_224.orig_in21k_ft_in1k"
# the explanations' preprocessing: squash resize, mean = std = 0.5
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
# (train split, evaluation split) of each dataset, in the dataset class's own names
SPLITS = {"voc": ("train", "val"), "cub": ("train", "test")}


def load_datasets(dataset: str, root: str, img_size: int = 224, year: str = "2012",
                  ) -> Tuple[AnnotatedImageDataset, AnnotatedImageDataset]:
    """``(train, evaluation)`` datasets of ``dataset`` ("voc" or "cub") with the explanations' preprocessing."""
    train_split, val_split = SPLITS[dataset]
    kw = dict(input_size=img_size, mean=MEAN, std=STD, transform="squash")
    if dataset == "voc":
        return (VOCSingleClass(root, year=year, split=train_split, **kw),
                VOCSingleClass(root, year=year, split=val_split, **kw))
    return CUBTest(root, split=train_split, **kw), CUBTest(root, split=val_split, **kw)


def data_fingerprint(splits: Dict[str, AnnotatedImageDataset]) -> str:
    """sha256 over the sorted ``split, relative image path, label`` lines of the given datasets."""
    lines = []
    for name, ds in splits.items():
        base = getattr(ds, "base", None) or ds.root
        for rec in ds.records:
            rel = os.path.relpath(rec.path, base).replace(os.sep, "/")
            lines.append(f"{name}\t{rel}\t{rec.label}\n")
    return hashlib.sha256("".join(sorted(lines)).encode("utf-8")).hexdigest()


def build_model(name: str, num_classes: int, pretrained: bool = False, checkpoint: Optional[str] = None,
                img_size: int = 224) -> torch.nn.Module:
    """A timm ViT with its weights (pretrained, a checkpoint, or random) and a fresh ``num_classes`` head."""
    model = timm.create_model(name, pretrained=pretrained, img_size=img_size)
    if checkpoint:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as e:  # shape mismatches raise even with strict=False
            raise ValueError(f"{checkpoint} does not fit {name}: {e}") from e
        missing = [k for k in missing if not k.startswith("head.")]
        if missing or unexpected:
            # a partial load would silently fine-tune a half-random backbone
            raise ValueError(f"{checkpoint} does not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.reset_classifier(num_classes)
    return model


def hflip(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Flip each image of ``[B, 3, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(x.shape[0], generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: torch.utils.data.DataLoader) -> float:
    """Top-1 accuracy of ``model`` over ``loader`` (eval mode; the caller restores train mode)."""
    model.eval()
    correct, count = 0, 0
    for batch in loader:
        pred = model(batch["image"]).argmax(1)
        correct += int((pred == batch["label"]).sum())
        count += int(batch["label"].numel())
    return correct / max(count, 1)


def cosine_lr(step: int, total: int, lr: float, min_lr: float, warmup: int) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay from ``lr`` to ``min_lr`` at ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    prog = (step - warmup) / max(total - warmup, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(prog, 1.0)))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(SPLITS))
    p.add_argument("--root", required=True, help="VOCdevkit (or VOC<year>) folder, or CUB_200_2011 (or its parent)")
    p.add_argument("--year", default="2012", help="VOC only")
    p.add_argument("--out", required=True)
    p.add_argument("--model", default=DEFAULT_MODEL, help="timm model name")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    weights.add_argument("--checkpoint", default=None, help="start from this state dict (head.* ignored)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many optimizer steps (0: no cap)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--freeze-backbone", action="store_true", help="train the new head only")
    p.add_argument("--no-hflip", action="store_true", help="no random horizontal flip")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    """Run the recipe (arguments as on the command line); returns what ``model.json`` holds."""
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    logf = open(os.path.join(a.out, "train_log.txt"), "w", encoding="utf-8")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    threads = torch.get_num_threads()
    try:
        return _run(a, log)
    finally:
        # main() is also called in-process (tests, notebooks): the thread count is global state
        torch.set_num_threads(threads)
        logf.close()


def _optimizer(a: argparse.Namespace, model: torch.nn.Module, log) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (the head only with ``--freeze-backbone``)."""
    head_params = {id(p_) for p_ in model.get_classifier().parameters()}
    if a.freeze_backbone:
        for p_ in model.parameters():
            p_.requires_grad_(id(p_) in head_params)
    trainable = [(n_, p_) for n_, p_ in model.named_parameters() if p_.requires_grad]

    def decays(name: str, param: torch.Tensor) -> bool:  # no weight decay on biases, norms, position embeddings, tokens
        return param.ndim > 1 and "pos_embed" not in name and "token" not in name

    opt = torch.optim.AdamW([{"params": [p_ for n_, p_ in trainable if decays(n_, p_)], "weight_decay": a.weight_decay},
                             {"params": [p_ for n_, p_ in trainable if not decays(n_, p_)], "weight_decay": 0.0}],
                            lr=a.lr)
    log(f"model: {a.model}, {sum(p_.numel() for _, p_ in trainable) / 1e6:.2f}M trainable of "
        f"{sum(p_.numel() for p_ in model.parameters()) / 1e6:.2f}M parameters")
    return opt


def _fit(a: argparse.Namespace, model: torch.nn.Module, opt: torch.optim.Optimizer, loaders, g: torch.Generator,
         log) -> Tuple[int, List[float], List[Dict[str, object]], float, float]:
    """Train for ``--epochs`` (at most ``--max-steps``), evaluating after each epoch.

    ``loaders``: ``(train, val)``. Returns ``(steps, losses, history, train accuracy, val accuracy)``.
    """
    train_loader, val_loader = loaders
    val_split = SPLITS[a.dataset][1]
    total = a.epochs * len(train_loader)
    if a.max_steps:
        total = min(total, a.max_steps)
    step, losses, history = 0, [], []
    train_acc, val_acc = 0.0, 0.0
    t_train = time.time()
    for epoch in range(1, a.epochs + 1):
        model.train()
        correct, count = 0, 0
        for batch in train_loader:
            if step >= total:
                break
            x, y = batch["image"], batch["label"]
            if not a.no_hflip:
                x = hflip(x, g)
            lr = cosine_lr(step, total, a.lr, a.min_lr, a.warmup_steps)
            for grp in opt.param_groups:
                grp["lr"] = lr
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=a.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(round(float(loss.detach()), 6))
            correct += int((logits.detach().argmax(1) == y).sum())
            count += int(y.numel())
            if step % 50 == 0:
                log(f"step {step}/{total} loss {losses[-1]:.4f} lr {lr:.2e}")
        if count == 0:
            break
        # accuracy over the augmented training batches as they were seen, not a separate clean pass
        train_acc = correct / count
        val_acc = evaluate(model, val_loader)
        history.append({"epoch": epoch, "steps": step, "train_accuracy": train_acc, "val_accuracy": val_acc})
        log(f"epoch {epoch}: train acc {train_acc:.4f}, {val_split} acc {val_acc:.4f}, step {step}, "
            f"elapsed {time.time() - t_train:.0f}s")
        if step >= total:
            break
    return step, losses, history, train_acc, val_acc


def _run(a: argparse.Namespace, log) -> Dict[str, object]:
    t_start = time.time()
    torch.manual_seed(a.seed)
    if a.threads:
        torch.set_num_threads(a.threads)
    log(f"args: {vars(a)}")
    log(f"torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}")

    train_ds, val_ds = load_datasets(a.dataset, a.root, a.img_size, a.year)
    if len(train_ds) == 0:
        raise ValueError(f"no training images found for {a.dataset} under {a.root}")
    classes: List[str] = list(train_ds.classes)
    train_split, val_split = SPLITS[a.dataset]
    fingerprint = data_fingerprint({train_split: train_ds, val_split: val_ds})
    log(f"data: {len(train_ds)} {train_split} / {len(val_ds)} {val_split} images, {len(classes)} classes, "
        f"fingerprint {fingerprint[:16]}")

    g = torch.Generator().manual_seed(a.seed)
    # drop_last: a last batch of one or two images would give a noisy step; shuffling spreads the leftovers
    train_loader = torch.utils.data.DataLoader(train_ds, batch_size=a.batch_size, shuffle=True, generator=g,
                                               num_workers=a.workers, collate_fn=collate_annotated,
                                               drop_last=len(train_ds) > a.batch_size)
    val_loader = torch.utils.data.DataLoader(val_ds, batch_size=a.batch_size, shuffle=False,
                                             num_workers=a.workers, collate_fn=collate_annotated)

    model = build_model(a.model, len(classes), a.pretrained, a.checkpoint, a.img_size)
    opt = _optimizer(a, model, log)
    step, losses, history, train_acc, val_acc = _fit(a, model, opt, (train_loader, val_loader), g, log)

    model.eval()
    wpath = os.path.join(a.out, "model.pth")
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, wpath)
    with open(wpath, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    cfg: Dict[str, object] = {
        "args": vars(a),
        "model": a.model,
        "model_kwargs": {"num_classes": len(classes), "img_size": a.img_size},
        "classes": classes,
        "data_config": {"input_size": a.img_size, "transform": "squash", "interpolation": "bilinear",
                        "mean": list(MEAN), "std": list(STD)},
        "data": {"dataset": a.dataset, "train_split": train_split, "val_split": val_split,
                 "train_images": len(train_ds), "val_images": len(val_ds), "fingerprint": fingerprint},
        "steps": step,
        "losses": losses,
        "history": history,
        "final_train_accuracy": train_acc,
        "final_val_accuracy": val_acc,
        "weights": os.path.basename(wpath),
        "sha256": sha,
        "wall_time_s": round(time.time() - t_start, 1),
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    with open(os.path.join(a.out, "model.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    log(f"saved {wpath}: {step} steps, train acc {train_acc:.4f}, {val_split} acc {val_acc:.4f}")
    return cfg


if __name__ == "__main__":
    main()
