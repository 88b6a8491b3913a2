"""ONNX Runtime AGCAM against the ONNX Runtime forward-only export and eager PyTorch, in one run.

Per model and batch: the classifier exported plainly (logits only) run by ONNX Runtime; the
captum-vit AGCAM graph (logits and cam) run by ONNX Runtime; eager PyTorch AGCAM
(``attribute(..., return_logits=True)``); and eager PyTorch's plain forward (``no_grad``). Also the two
files' sizes. With ``--device cuda`` (onnxruntime-gpu), the ONNX rows run with and without
IOBinding (inputs and outputs kept on the GPU), in fp32 and fp16.

    python benchmarks/onnx_speed.py --out benchmarks/results/onnx_cpu_fp32.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from captum_vit import AGCAM  # noqa: E402
from captum_vit.onnx import export_onnx  # noqa: E402


def timeit(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1000


def _no_grad(model, x):
    with torch.no_grad():
        return model(x)


def export_plain(model, path, size, half=False):
    model = copy.deepcopy(model).half() if half else model
    x = torch.zeros(2, *size, dtype=torch.float16 if half else torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "b"}, "logits": {0: "b"}}, opset_version=17, dynamo=False)
    return path


def session(path, device):
    import onnxruntime as ort

    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(path, providers=providers)


def ort_call(sess, feeds, device, iobinding):
    """A zero-argument callable running ``sess`` on ``feeds`` (numpy), optionally through IOBinding."""
    if not iobinding:
        return lambda: sess.run(None, feeds)
    import onnxruntime as ort

    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, 0))
    for out in sess.get_outputs():
        binding.bind_output(out.name, device)

    def run():
        sess.run_with_iobinding(binding)

    return run


def run(models, batches, device, precisions, repeats):
    import timm

    rows = []
    tmp = tempfile.mkdtemp()
    for name in models:
        torch.manual_seed(0)
        if name == "shapes_vit":
            from captum_vit.zoo import shapes_vit

            model, cfg = shapes_vit()
        else:
            model = timm.create_model(name, pretrained=False).eval()
            cfg = None
        size = tuple(cfg["input_size"]) if cfg else (3, 224, 224)
        for precision in precisions:
            half = precision == "fp16"
            cam_path = export_onnx(model, os.path.join(tmp, f"{name}_{precision}_cam.onnx"), data_config=cfg,
                                   fp16=half)
            plain_path = export_plain(model, os.path.join(tmp, f"{name}_{precision}_plain.onnx"), size, half)
            cam_sess, plain_sess = session(cam_path, device), session(plain_path, device)
            for b in batches:
                x = np.random.default_rng(0).standard_normal((b, *size)).astype(np.float32)
                t = (np.arange(b) % 10).astype(np.int64)
                res = {"model": name, "batch": b, "precision": precision,
                       "cam_mb": os.path.getsize(cam_path) / 2**20, "plain_mb": os.path.getsize(plain_path) / 2**20}
                plain_x = x.astype(np.float16) if half else x
                for io in ([False, True] if device == "cuda" else [False]):
                    tag = "_iobinding" if io else ""
                    res["ort_forward" + tag] = timeit(ort_call(plain_sess, {"image": plain_x}, device, io), repeats)
                    res["ort_cam" + tag] = timeit(ort_call(cam_sess, {"image": x, "target": t}, device, io), repeats)
                if not half and device == "cpu":
                    xt, tt = torch.from_numpy(x), torch.from_numpy(t)
                    agcam = AGCAM(model)
                    res["torch_forward"] = timeit(lambda: _no_grad(model, xt), repeats)  # noqa: B023
                    res["torch_agcam"] = timeit(lambda: agcam.attribute(xt, target=tt, return_logits=True),  # noqa: B023
                                                repeats)
                rows.append(res)
                print("  " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()),
                      flush=True)
    return rows


def table(rows, header):
    keys = [k for k in ("ort_forward", "ort_cam", "ort_forward_iobinding", "ort_cam_iobinding", "torch_forward",
                        "torch_agcam") if any(k in r for r in rows)]
    lines = [header, "", "| model | precision | batch | file MB (cam / forward-only) | " + " | ".join(
        f"{k} ms" for k in keys) + " | ORT cam / ORT forward |", "|---|---|---|---|" + "---|" * (len(keys) + 1)]
    for r in rows:
        cells = [f"{r[k]:.1f}" if k in r else "" for k in keys]
        ratio = r["ort_cam"] / r["ort_forward"]
        lines.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['cam_mb']:.1f} / {r['plain_mb']:.1f} | "
                     + " | ".join(cells) + f" | {ratio:.2f}x |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes_vit", "vit_small_patch16_224", "vit_base_patch16_224"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--precisions", nargs="+", default=None,
                    help="fp32 and/or fp16 (default: fp32 on CPU, both on GPU)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", default=None, help="write the table (markdown)")
    a = ap.parse_args()
    import onnxruntime as ort

    precisions = a.precisions or (["fp32"] if a.device == "cpu" else ["fp32", "fp16"])
    dev = f"{platform.machine()} CPU, {os.cpu_count()} cores" if a.device == "cpu" else "GPU (onnxruntime-gpu)"
    header = (f"ONNX Runtime {ort.__version__} vs eager torch {torch.__version__} on {dev}; median of {a.repeats} "
              "runs; random-init timm weights, the shipped shapes ViT's own.")
    print(header, flush=True)
    md = table(run(a.models, a.batches, a.device, precisions, a.repeats), header)
    print()
    print(md)
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            f.write(md + "\n")


if __name__ == "__main__":
    main()
