"""Evaluation throughput: images per second of the localization and the ABPC protocols.

Each protocol runs alone (``captum_vit.evaluation.evaluate`` with one metric group, in memory, no
maps kept; the median of ``--repeats`` runs) per method, on images generated beforehand, so
that the figure is the evaluation's and not the synthetic images' generation. Every image's
label is set to the model's own prediction, so that every image is "correctly classified" and
gets the localization protocol's full work: the figure is a lower bound on the throughput of a
real run, where misclassified images skip localization. Random-init weights are fine for speed.

The projection for ImageNet val is 50,000 images / (images per second).

    python benchmarks/eval_speed.py                                  # CPU: the shipped model, then ViT-B/16
    python benchmarks/eval_speed.py --models vit_base_patch16_224 --device cuda --batch-size 64 --n 512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from captum_vit.data import ShapesDataset  # noqa: E402
from captum_vit.evaluation import evaluate  # noqa: E402
from captum_vit.models import load_model  # noqa: E402

IMAGENET_VAL = 50_000


class Pregenerated(ShapesDataset):
    """The shapes benchmark's first ``n`` images held in memory, labelled with ``model``'s predictions."""

    def __init__(self, model, cfg, n, batch_size, device):
        size = int(cfg["input_size"][-1])
        super().__init__("single", seed=2024, size=n, image_size=size, mean=cfg["mean"], std=cfg["std"])
        self.items = [super(Pregenerated, self).__getitem__(i) for i in range(n)]
        with torch.no_grad():
            for i in range(0, n, batch_size):
                x = torch.stack([s["image"] for s in self.items[i:i + batch_size]]).to(device)
                for s, p in zip(self.items[i:i + batch_size], model(x).argmax(-1).tolist()):
                    s["label"] = p

    def __getitem__(self, index):
        return self.items[index]


def measure(model, data, method, group, batch_size, abpc_batch_size, device, repeats):
    kw = dict(metrics=(group,), batch_size=batch_size, progress=False, keep_maps=False,
              abpc_batch_size=abpc_batch_size)
    evaluate(model, data, method, limit=batch_size, **kw)  # warm-up: first-call allocations
    rates = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        r = evaluate(model, data, method, **kw)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(r["n_images"] / (time.perf_counter() - t0))
    return statistics.median(rates)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes_vit", "vit_base_patch16_224"])
    ap.add_argument("--methods", default="agcam,rollout,lrp")
    ap.add_argument("--n", type=int, nargs="+", default=[64, 16], help="images per model (one value or one each)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--abpc-batch-size", type=int, default=64, help="perturbed copies per forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the median is reported")
    ap.add_argument("--out", help="write the markdown table here and a .json beside it")
    a = ap.parse_args()
    ns = a.n if len(a.n) == len(a.models) else [a.n[0]] * len(a.models)
    rows = []
    for name, n in zip(a.models, ns):
        model, cfg, _ = load_model(name, device=a.device) if name == "shapes_vit" else _random(name, a.device)
        data = Pregenerated(model, cfg, n, a.batch_size, a.device)
        for method in a.methods.split(","):
            for group in ("localization", "abpc"):
                ips = measure(model, data, method, group, a.batch_size, a.abpc_batch_size, a.device, a.repeats)
                rows.append({"model": name, "method": method, "protocol": group, "n": n, "images_per_s": ips,
                             "imagenet_val_min": IMAGENET_VAL / ips / 60})
                print(f"{name} {method} {group}: {ips:.2f} img/s", file=sys.stderr, flush=True)
    head = (f"Evaluation throughput on {a.device} ({platform.machine()}, {torch.get_num_threads()} threads, fp32, "
            f"torch {torch.__version__}); median of {a.repeats} runs; batch {a.batch_size}, ABPC {a.abpc_batch_size} "
            "perturbed copies per "
            "forward; every image labelled with the model's prediction (full localization work).")
    lines = [head, "", "| model | method | protocol | images | images/s | 50,000 images (min) |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['method']} | {r['protocol']} | {r['n']} | {r['images_per_s']:.2f} | "
              f"{r['imagenet_val_min']:.0f} |" for r in rows]
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)


def _random(name, device):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are fine for speed
        return load_model(name, device=device)


if __name__ == "__main__":
    main()
