"""Evaluation throughput: images per second of the localization and the ABPC protocols.

Each protocol runs alone (``captum_vit.evaluation.evaluate`` with one metric group, in memory, no
maps kept; the median of ``--repeats`` runs) per method, on images generated beforehand, so
that the figure is the evaluation's and not the synthetic images' generation. Every image's
label is set to the model's own prediction, so that every image is "correctly classified" and
gets the localization protocol's full work: the figure is a lower bound on the throughput of a
real run, where misclassified images skip localization. Random-init weights are fine for speed.

The projection for ImageNet val is 50,000 images / (images per second).

Per model and method it also prints the ABPC overhead, ``ABPC time / (18 x forward time)`` (goal: at most
1.1): the forward time per image is ``model_fn`` on ``--abpc-batch-size`` images, the ABPC time per image
that of the ``abpc(...)`` calls alone (batch by batch, as the runner makes them) on maps computed
beforehand and with the unperturbed logits given (``logits=``), so that the explanation's time is not in
it; both are medians of ``--repeats`` runs. 18 is the number of perturbed copies per image; the rest is
the one all-baseline copy per call, the ranking and the copies' construction. The two are timed in turn,
per method, so that the ratio holds on a machine whose load varies.

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

from captum_vit.attr import METHODS  # noqa: E402
from captum_vit.data import ShapesDataset  # noqa: E402
from captum_vit.evaluation import evaluate  # noqa: E402
from captum_vit.metrics import abpc  # noqa: E402
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


def _seconds(fn, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def abpc_overhead(model, data, method, batch_size, abpc_batch_size, device, repeats):
    """``(forward, abpc)`` seconds per image, each the median of ``repeats`` runs after a warm-up.

    forward: ``model_fn`` on ``abpc_batch_size`` images (the data's, cycled); abpc: the ``abpc`` calls
    alone, batch by batch, on maps computed beforehand, with ``logits=`` given. The two are timed in
    turn in every repeat, so that a load that varies over the run weighs on both alike.
    """
    def model_fn(x):
        with torch.no_grad():
            return model(x)

    explainer = METHODS[method](model)
    batches = []
    for i in range(0, len(data), batch_size):
        items = [data[j] for j in range(i, min(i + batch_size, len(data)))]
        x = torch.stack([s["image"] for s in items]).to(device)
        labels = torch.tensor([int(s["label"]) for s in items], device=device)
        batches.append((x, explainer.attribute(x, target=labels).detach(), labels, model_fn(x)))
    x_fwd = torch.stack([data[i % len(data)]["image"] for i in range(abpc_batch_size)]).to(device)

    def run_abpc():
        for x, maps, labels, logits in batches:
            abpc(model_fn, x, maps, labels, batch_size=abpc_batch_size, logits=logits)

    forward, scored = [], []
    for r in range(repeats + 1):  # the first is the warm-up
        f, t = _seconds(lambda: model_fn(x_fwd), device), _seconds(run_abpc, device)
        if r:
            forward.append(f / abpc_batch_size)
            scored.append(t / len(data))
    return statistics.median(forward), statistics.median(scored)


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
                row = {"model": name, "method": method, "protocol": group, "n": n, "images_per_s": ips,
                       "imagenet_val_min": IMAGENET_VAL / ips / 60}
                print(f"{name} {method} {group}: {ips:.2f} img/s", file=sys.stderr, flush=True)
                if group == "abpc":
                    fwd, t = abpc_overhead(model, data, method, a.batch_size, a.abpc_batch_size, a.device,
                                           a.repeats)
                    row.update(forward_ms_per_image=fwd * 1e3, abpc_ms_per_image=t * 1e3,
                               abpc_over_18_forwards=t / (18 * fwd))
                    print(f"{name} {method} ABPC / (18 x forward): {t * 1e3:.1f} ms / (18 x {fwd * 1e3:.2f} ms) = "
                          f"{t / (18 * fwd):.3f} (goal <= 1.1)", file=sys.stderr, flush=True)
                rows.append(row)
    head = (f"Evaluation throughput on {a.device} ({platform.machine()}, {torch.get_num_threads()} threads, fp32, "
            f"torch {torch.__version__}); median of {a.repeats} runs; batch {a.batch_size}, ABPC {a.abpc_batch_size} "
            "perturbed copies per "
            "forward; every image labelled with the model's prediction (full localization work). "
            f"Forward: model_fn on {a.abpc_batch_size} images, per image; ABPC calls: abpc(...) alone on "
            "precomputed maps with logits= given, per image; ratio: ABPC calls / (18 x forward), goal <= 1.1.")
    lines = [head, "", "| model | method | protocol | images | images/s | 50,000 images (min) | forward (ms/img) "
             "| ABPC calls (ms/img) | ABPC / (18 x forward) |", "|---|---|---|---|---|---|---|---|---|"]

    def extra(r):
        if "abpc_over_18_forwards" not in r:
            return "| | |"
        return f"{r['forward_ms_per_image']:.2f} | {r['abpc_ms_per_image']:.1f} | {r['abpc_over_18_forwards']:.3f} |"

    lines += [f"| {r['model']} | {r['method']} | {r['protocol']} | {r['n']} | {r['images_per_s']:.2f} | "
              f"{r['imagenet_val_min']:.0f} | {extra(r)}" for r in rows]
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
