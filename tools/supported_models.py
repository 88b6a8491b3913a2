"""The supported-models table of README.md: every ViT family tried on a tiny random-init model.

    python -m tools.supported_models            # print the table (markdown)
    python -m tools.supported_models --write    # and write it between the README's markers

Every row is one tiny config of tests/helpers.py (the family builders ``FAMILIES`` and the timm /
Hugging Face variants of ``make()``), explained here and now: a method is listed when it
constructs and its map comes out finite on a batch of two images (marked "(pooled)" where it
needs ``query="pooled"``), the AGCAM engine is the one ``engine="auto"`` picks, and ONNX says
whether ``export_onnx`` (AGCAM) writes the file and ONNX Runtime reproduces the eager map. A
model that captum-vit refuses, or that the installed timm / transformers cannot build, is a row
saying so, never a crash, so the table is what the code of this checkout does. The README's
table is checked against this script's output by tests/test_supported_models.py.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Type

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
START, END = "<!-- supported-models:start -->", "<!-- supported-models:end -->"
TARGETS = [1, 4]


@dataclass(frozen=True)
class Family:
    """What a row says about a config before trying it: its family and the real models it is modelled on."""

    family: str
    examples: str


#: The timm / Hugging Face variants of tests/helpers.py ``make()`` shown in the table.
ARCH_ROWS = ["plain", "qk_norm", "layerscale", "distilled", "registers", "dynamic", "convstem", "scale_norm",
             "respost", "hf"]

#: Rows' descriptions; a family of tests/helpers.py ``FAMILIES`` missing here is shown by its key.
DESCRIPTIONS: Dict[str, Family] = {
    "plain": Family("timm `VisionTransformer`, [class] token", "`vit_base_patch16_224`, `deit_small_patch16_224`"),
    "qk_norm": Family("timm `VisionTransformer`, `qk_norm=True`", "`vit_base_patch16_xp_224`"),
    "layerscale": Family("timm `VisionTransformer`, LayerScale (`init_values`)", "`deit3_small_patch16_224`"),
    "distilled": Family("timm DeiT distilled (2 prefix tokens)", "`deit_base_distilled_patch16_224`"),
    "registers": Family("timm `VisionTransformer`, register tokens", "`vit_small_patch14_reg4_dinov2`"),
    "dynamic": Family("timm `VisionTransformer`, `dynamic_img_size=True` (48x80 input)",
                      "any `vit_*` with `dynamic_img_size=True`"),
    "convstem": Family("timm `VisionTransformer`, convolutional stem", "the shipped shapes ViT"),
    "scale_norm": Family("timm `VisionTransformer`, `scale_attn_norm=True`", "-"),
    "respost": Family("timm `VisionTransformer`, post-norm `ResPostBlock`", "-"),
    "hf": Family("Hugging Face `ViTForImageClassification`", "`google/vit-base-patch16-224`"),
    "eva_cls": Family("timm `Eva`, rotary + SwiGLU, [class] token", "like `vit_base_patch16_rope_224`"),
    "eva_packed": Family("timm `Eva`, rotary + packed SwiGLU, [class] token",
                         "`Eva(swiglu_mlp=True, scale_mlp=False)`"),
    "eva02_avg": Family("timm `Eva` (EVA02), average pooling", "`eva02_base_patch14_448`"),
    "pe_core_map": Family("timm `Eva` (Perception Encoder), MAP head", "`vit_pe_core_base_patch16_224`"),
    "beit_cls": Family("timm `Beit`, relative position bias, [class] token", "`Beit(global_pool='token')`"),
    "beit_avg": Family("timm `Beit`, relative position bias, average pooling", "`beit_base_patch16_224`"),
    "relpos_cls": Family("timm `VisionTransformerRelPos`, [class] token", "`vit_relpos_base_patch16_cls_224`"),
    "relpos_avg": Family("timm `VisionTransformerRelPos`, average pooling", "`vit_relpos_medium_patch16_224`"),
    "relpos_shared": Family("timm `VisionTransformerRelPos`, shared bias, [class] token",
                            "like `vit_srelpos_medium_patch16_224`"),
    "vit_gap": Family("timm `VisionTransformer`, no [class] token, average pooling", "`vit_medium_patch16_gap_256`"),
    "vit_map": Family("timm `VisionTransformer`, no [class] token, MAP head", "`vit_base_patch16_siglip_224`"),
    "naflex": Family("timm `NaFlexVit`, register token, MAP head", "`naflexvit_base_patch16_map`"),
    "naflex_cls": Family("timm `NaFlexVit`, [class] token", "`NaFlexVit(global_pool='token', class_token=True)`"),
    "hf_deit": Family("Hugging Face `DeiTForImageClassification`", "`facebook/deit-base-patch16-224`"),
    "hf_deit_teacher": Family("Hugging Face `DeiTForImageClassificationWithTeacher`",
                              "`facebook/deit-base-distilled-patch16-224`"),
    "hf_dinov2": Family("Hugging Face `Dinov2ForImageClassification`", "`facebook/dinov2-small-imagenet1k-1-layer`"),
    "hf_dinov2_swiglu": Family("Hugging Face `Dinov2ForImageClassification`, SwiGLU",
                               "`facebook/dinov2-giant-imagenet1k-1-layer`"),
    "hf_dinov2_registers": Family("Hugging Face `Dinov2WithRegistersForImageClassification`", "-"),
}

HEADER = ("| family | models like | pooling | methods that work | AGCAM engine | ONNX (AGCAM) |\n"
          "|---|---|---|---|---|---|")


def _helpers():
    tests = os.path.join(ROOT, "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import helpers  # type: ignore[import-not-found]  # tests/helpers.py, found through sys.path

    return helpers


Row = Tuple[str, Callable[[], torch.nn.Module], Callable[[], torch.Tensor]]


def rows() -> List[Row]:
    """``(key, build, inputs)`` for every row: the ``make()`` variants, then every family of ``FAMILIES``."""
    h = _helpers()
    out: List[Row] = []
    for arch in ARCH_ROWS:
        out.append((arch, functools.partial(h.make, arch), functools.partial(h.input_for, arch, batch=2)))
    for name in h.FAMILIES:
        out.append((name, functools.partial(h.make_family, name), functools.partial(h.family_input, name, batch=2)))
    return out


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _short(message: object) -> str:
    """The reason in a refusal, without the method's preamble and the explanation after it."""
    text = " ".join(str(message).split())
    for preamble in ("which does not apply to this model: ", "is not defined for this model: "):
        if preamble in text:
            text = text.split(preamble, 1)[1]
    text = re.split(r" \(|, so |; |\. ", text, maxsplit=1)[0]
    return text.rstrip(".")


def _skip_exception() -> Type[BaseException]:
    import pytest

    return pytest.skip.Exception


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        torch.set_num_threads(before)


def _methods(model: torch.nn.Module, x: torch.Tensor) -> Tuple[List[str], Any]:
    """The methods that run on ``model`` (``"name (pooled)"`` where they need ``query='pooled'``), and AGCAM."""
    from captum_vit.attr import METHODS

    works, agcam = [], None
    for name, cls in METHODS.items():
        for kwargs in ({}, {"query": "pooled"}):
            try:
                method = cls(model, **kwargs)
            except (ValueError, TypeError):
                continue
            label = name + (" (pooled)" if kwargs else "")
            try:
                cam = method.attribute(x, target=TARGETS)
            except Exception as e:  # noqa: BLE001 - a row reports any failure rather than stopping the table
                works.append(f"{label} fails: {type(e).__name__}: {_short(e)}")
                break
            works.append(label if bool(torch.isfinite(cam).all()) else f"{label} (non-finite map)")
            if name == "agcam":
                agcam = method
            break
    return works, agcam


def _onnx(model: torch.nn.Module, x: torch.Tensor, agcam: Any) -> str:
    from captum_vit.onnx import export_onnx

    cfg = {"input_size": tuple(x.shape[1:]), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "squash"}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        try:
            export_onnx(model, path, data_config=cfg)
        except ValueError as e:
            return f"no: {_short(e)}"
        except Exception as e:  # noqa: BLE001 - a failed trace is a row, not a crash
            return f"no: {type(e).__name__}: {_short(e)}"
        try:
            import numpy as np
            import onnxruntime as ort
        except ImportError:
            return "yes (not run: no onnxruntime)"
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        _, cam = session.run(None, {"image": x.numpy(), "target": np.asarray(TARGETS, dtype=np.int64)})
    eager = agcam.attribute(x, target=TARGETS).flatten(1).double() if agcam is not None else None
    if eager is None:
        return "exported"
    err = float((torch.from_numpy(cam).flatten(1).double() - eager).abs().max() / eager.abs().max().clamp_min(1e-30))
    return "yes" if err <= 1e-4 else "exported, but ONNX Runtime differs from eager"


def probe(build: Callable[[], torch.nn.Module], inputs: Callable[[], torch.Tensor]) -> Dict[str, str]:
    """One row's cells after ``family`` and ``models like``."""
    from captum_vit.vit import UnsupportedModelError, adapt

    dash = {"pooling": "-", "engine": "-", "onnx": "-"}
    try:
        model = build()
    except _skip_exception() as e:
        return {**dash, "methods": f"not built here: {_short(getattr(e, 'msg', e))}"}
    try:
        adapter = adapt(model)
    except UnsupportedModelError as e:
        return {**dash, "methods": f"refused: {_short(e)}"}
    x = inputs()
    works, agcam = _methods(model, x)
    engine = agcam.resolved_engine().replace("_", "-") if agcam is not None else "-"
    return {
        "pooling": adapter.pooling,
        "methods": ", ".join(works) if works else "none",
        "engine": engine,
        "onnx": _onnx(model, x, agcam),
    }


def versions() -> str:
    import timm

    try:
        import transformers

        hf = f", transformers {transformers.__version__}"
    except ImportError:
        hf = ""
    return f"timm {timm.__version__}{hf}"


def table() -> str:
    """The markdown table, a row per config, and the line saying what made it."""
    lines = [HEADER]
    with _quiet():
        for key, build, inputs in rows():
            d = DESCRIPTIONS.get(key, Family(f"`{key}`", "-"))
            cells = probe(build, inputs)
            lines.append("| " + " | ".join(_cell(c) for c in (d.family, d.examples, cells["pooling"], cells["methods"],
                                                               cells["engine"], cells["onnx"])) + " |")
    lines.append("")
    lines.append(f"Generated by `python -m tools.supported_models --write` with {versions()}.")
    return "\n".join(lines)


def readme_table(text: str) -> Optional[str]:
    """The table between the README's markers (``None`` without them)."""
    if START not in text or END not in text:
        return None
    return text.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write(generated: str, path: str = README) -> None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if readme_table(text) is None:
        raise SystemExit(f"{path} has no {START} ... {END} markers; add them where the table belongs")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{START}\n{generated}\n{END}{tail}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help="write the table between the markers in README.md")
    args = parser.parse_args(argv)
    generated = table()
    print(generated)
    if args.write:
        write(generated)


if __name__ == "__main__":
    main()
