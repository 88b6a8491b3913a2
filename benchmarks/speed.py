"""Cost of every method against a plain forward pass, measured in one run.

Per model and batch: the model's own default forward (``torch.no_grad``); AGCAM with the
one-token engine and with the generic autograd engine; the official AGCAM way (a per-image
loop of forward + ``backward()`` with weights requiring grad, unfused attention with detached
inputs, attention gradients read from ``.grad``); every other method of
``captum_vit.attr.METHODS`` with its defaults; and the plain forward again after 4 threads x 8
concurrent AGCAM calls. A second table gives each method's milliseconds per image at every
batch size. Random-init weights: timing does not depend on them.

    python benchmarks/speed.py                       # CPU, fp32, vit_small + vit_base, batch 1 and 8
    python benchmarks/speed.py --device cuda --dtype bf16 --out benchmarks/results/speed_cuda_bf16.md
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import threading
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from captum_vit import AGCAM  # noqa: E402
from captum_vit.attr import METHODS  # noqa: E402
from captum_vit.vit import Record, Request, adapt  # noqa: E402


def official_way(model, x, targets):
    """Per-image forward + backward, weights requiring grad, as the official code runs."""
    adapter = adapt(model)
    P = adapter.num_prefix_tokens
    maps = []
    for i in range(x.shape[0]):
        model.zero_grad(set_to_none=True)
        # the pure forward without the library's parameters-as-constants mode: the weights require grad,
        # as in the official code
        xi = x[i : i + 1]
        grid = adapter._grid(*xi.shape[-2:])
        rec = Record(grid=grid, context=adapter.context(grid))
        rec.logits = adapter._pure_forward(xi, rec, Request(detach=True, attention="keep", scores_cls=True))
        for a in rec.attention:
            a.retain_grad()
        rec.logits[0, int(targets[i])].backward()
        m = sum((torch.sigmoid(s[0, :, P:]) * torch.relu(a.grad[0, :, 0, P:])).sum(0)
                for s, a in zip(rec.scores_cls, rec.attention))
        maps.append(m.detach())
    return torch.stack(maps)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device, repeats, warmup=1):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


#: Timed columns after the forward, in table order: (key, label).
COLUMNS = [("agcam_one_token", "AGCAM one-token"), ("agcam_generic", "AGCAM generic")] + [
    (name, name) for name in METHODS if name != "agcam"
] + [("official_loop", "official AGCAM loop")]


def measure(model, grad_model, methods, x, t, device, repeats):
    """Median milliseconds of each timed call on one batch."""

    def plain():
        with torch.no_grad():
            model(x)

    res = {"forward": timeit(plain, device, repeats)}
    for key, method in methods.items():
        res[key] = timeit(lambda m=method: m.attribute(x, target=t), device, repeats)
    res["official_loop"] = timeit(lambda: official_way(grad_model, x, t), device, max(1, repeats // 2))
    # A plain forward after 4 threads x 8 concurrent AGCAM calls costs what it cost before:
    # no call leaves anything on the model.
    one = methods["agcam_one_token"]
    threads = [threading.Thread(target=lambda: [one.attribute(x, target=t) for _ in range(8)]) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    res["forward_after_threads"] = timeit(plain, device, repeats)
    return res


def run(models, batches, device, dtype, repeats):
    import timm

    rows = []
    for name in models:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False).to(device=device, dtype=dtype).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        grad_model = copy.deepcopy(model)
        for p in grad_model.parameters():
            p.requires_grad_(True)
        methods = {"agcam_one_token": AGCAM(model, engine="one_token"), "agcam_generic": AGCAM(model, engine="generic")}
        methods.update({key: METHODS[key](model) for key, _ in COLUMNS if key in METHODS})
        for b in batches:
            x = torch.randn(b, 3, 224, 224, device=device, dtype=dtype)
            t = torch.arange(b, device=device) % model.num_classes
            res = measure(model, grad_model, methods, x, t, device, repeats)
            # Sanity: the timed paths compute the same maps.
            a = methods["agcam_one_token"].attribute(x, target=t).flatten(1).float()
            o = official_way(grad_model, x, t).float()
            err = ((a - o).abs().max() / o.abs().max()).item()
            rows.append({"model": name, "batch": b, **res, "max_rel_diff_vs_official": err})
            print(f"  {name} b={b}: " + ", ".join(f"{k}={v:.1f}ms" for k, v in res.items()) + f", rel.diff={err:.1e}",
                  flush=True)
    return rows


def table(rows, header):
    cols = COLUMNS + [("forward_after_threads", "forward after threaded calls")]
    lines = [header, "", "Milliseconds per call (x the plain forward):", "",
             "| model | batch | forward | " + " | ".join(label for _, label in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for r in rows:
        f = r["forward"]
        cells = [f"{r[k]:.1f} ({r[k] / f:.2f}x)" for k, _ in cols]
        lines.append(f"| {r['model']} | {r['batch']} | {f:.1f} | " + " | ".join(cells) + " |")
    batches = sorted({r["batch"] for r in rows})
    lines += ["", "Milliseconds per image (batch 1 / largest batch = speed-up from batching):", "",
              "| model | method | " + " | ".join(f"batch {b}" for b in batches) + " | speed-up |",
              "|---|---|" + "---|" * (len(batches) + 1)]
    for model in dict.fromkeys(r["model"] for r in rows):
        mrows = sorted((r for r in rows if r["model"] == model), key=lambda r: r["batch"])
        for key, label in [("forward", "forward")] + COLUMNS:
            per_image = [r[key] / r["batch"] for r in mrows]
            lines.append(f"| {model} | {label} | " + " | ".join(f"{v:.1f}" for v in per_image)
                         + f" | {per_image[0] / per_image[-1]:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None, help="write the table (markdown) and a .json beside it")
    a = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    cpu = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu
    header = (f"Speed on {dev}, {a.dtype}, torch {torch.__version__}; median of {a.repeats} runs "
              f"({max(1, a.repeats // 2)} for the official loop); random-init weights.")
    print(header, flush=True)
    rows = run(a.models, a.batches, a.device, dtype, a.repeats)
    md = table(rows, header)
    print()
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
