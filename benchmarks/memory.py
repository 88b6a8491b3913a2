"""Peak memory of every method against a plain ``no_grad`` forward pass, each in a fresh process.

Each measurement runs in its own Python process: build the model and the batch, reset the
kernel's peak-RSS counter (``/proc/self/clear_refs``), run the call once, and report the
growth of the peak resident set over the resident set just before the call. A fresh process
keeps one measurement's freed-but-cached memory from hiding the next one's. The allocator's
per-thread arenas make one run's figure vary by up to ~40% from process to process, so each
call runs in several processes and the table gives the median and the range. Linux only.

    python benchmarks/memory.py --out benchmarks/results/memory_cpu_fp32.md
    python benchmarks/memory.py --calls lrp gae --runs 3      # the forward and these calls only
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CALLS = ("forward", "agcam_one_token", "agcam_generic", "rollout", "lrp", "gae", "cdam", "raw", "attnlrp")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(call: str, model_name: str, batch: int) -> dict:
    """Run in the child process: peak RSS growth of one call, in bytes."""
    import timm
    import torch

    sys.path.insert(0, os.path.join(HERE, ".."))
    from captum_vit import AGCAM
    from captum_vit.attr import METHODS

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    x = torch.randn(batch, 3, 224, 224)
    t = torch.arange(batch) % model.num_classes
    if call == "forward":
        fn = lambda: model(x)  # noqa: E731
    elif call.startswith("agcam_"):
        fn = lambda: AGCAM(model, engine=call[len("agcam_"):]).attribute(x, target=t)  # noqa: E731
    else:
        fn = lambda: METHODS[call](model).attribute(x, target=t)  # noqa: E731
    gc.collect()
    base = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    with torch.no_grad():
        out = fn()
    peak = _status("VmHWM")
    del out
    return {"call": call, "model": model_name, "batch": batch, "peak_growth_bytes": peak - base}


def run(models, batch, runs, calls=CALLS):
    rows = []
    for name in models:
        row = {"model": name, "batch": batch}
        for call in calls:
            growth = []
            for _ in range(runs):
                res = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--child", call, name, str(batch)],
                    check=True, capture_output=True, text=True,
                )
                growth.append(json.loads(res.stdout.strip().splitlines()[-1])["peak_growth_bytes"] / 2**20)
            row[call] = statistics.median(growth)
            row[call + "_range"] = (min(growth), max(growth))
            print(f"  {name} b={batch} {call}: +{row[call]:.0f} MB (runs: {', '.join(f'{g:.0f}' for g in growth)})",
                  flush=True)
        rows.append(row)
    return rows


def table(rows, header, calls=CALLS):
    lines = [header, "",
             "| model | batch | forward (no_grad) | " + " | ".join(calls[1:]) + " |",
             "|---|---|---|" + "---|" * (len(calls) - 1)]
    for r in rows:
        f = r["forward"]
        cells = [f"+{r[c]:.0f} MB ({r[c] / f:.2f}x; {r[c + '_range'][0]:.0f}-{r[c + '_range'][1]:.0f})"
                 for c in calls[1:]]
        f_lo, f_hi = r["forward_range"]
        head = f"| {r['model']} | {r['batch']} | +{f:.0f} MB ({f_lo:.0f}-{f_hi:.0f}) | "
        lines.append(head + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[8, 64])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per call; the table gives the median")
    ap.add_argument("--calls", nargs="+", default=list(CALLS[1:]), choices=CALLS[1:],
                    help="calls to measure against the forward (default all)")
    ap.add_argument("--out", default=None, help="write the table (markdown) and a .json beside it")
    a = ap.parse_args()
    calls = ("forward", *a.calls)
    import torch

    header = (f"Peak resident-memory growth during one call (CPU, fp32, {platform.machine()}, "
              f"torch {torch.__version__}); median (min-max) of {a.runs} runs, "
              "each call in a fresh process; random-init weights.")
    print(header, flush=True)
    rows = [row for b in a.batches for row in run(a.models, b, a.runs, calls)]
    md = table(rows, header, calls)
    print()
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md + "\n")
        with open(os.path.splitext(a.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
