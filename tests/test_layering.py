"""The deployment runtime under ``export/`` must run without torch (numpy, pillow and onnxruntime only).

import-linter checks the layering inside the ``captum_vit`` package (contracts in pyproject.toml);
``export/`` lives beside the package, so its rule is checked here by reading the sources.
"""

import ast
import pathlib
from typing import List, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
#: Top-level packages that are torch or import it.
TORCH_PACKAGES = {"torch", "torchvision", "torchaudio"}


def _is_torch(module: str) -> bool:
    return module.split(".")[0] in TORCH_PACKAGES


def torch_imports(path: pathlib.Path) -> List[Tuple[int, str]]:
    """``(line, module)`` for every import of a torch package in a Python file, at any depth.

    Covers ``import torch[.x]``, ``from torch[.x] import ...`` and ``importlib.import_module`` /
    ``__import__`` with a literal name; relative imports are the package's own modules.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_torch(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _is_torch(node.module):
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            arg = node.args[0].value
            if name in ("import_module", "__import__") and isinstance(arg, str) and _is_torch(arg):
                found.append((node.lineno, arg))
    return found


def test_export_runtime_imports_no_torch():
    files = sorted((ROOT / "export").glob("**/*.py"))
    offenders = {str(f.relative_to(ROOT)): hits for f in files if (hits := torch_imports(f))}
    assert offenders == {}, f"the export/ runtime must not import torch: {offenders}"


@pytest.mark.parametrize("source, expected", [
    ("import torch\n", [(1, "torch")]),
    ("import numpy as np, torch.nn as nn\n", [(1, "torch.nn")]),
    ("from torch import nn\n", [(1, "torch")]),
    ("from torch.nn import functional as F\n", [(1, "torch.nn")]),
    ("import torchvision\n", [(1, "torchvision")]),
    ("def load():\n    import torch\n    return torch\n", [(2, "torch")]),
    ("import importlib\nt = importlib.import_module('torch')\n", [(2, "torch")]),
    ("t = __import__('torch.onnx')\n", [(1, "torch.onnx")]),
    ("import numpy as np\nfrom PIL import Image\nimport onnxruntime\n", []),
    ("# import torch\ntext = 'import torch'\n", []),
    ("from . import torch_free\nfrom .torch import helpers\nimport torchlike\n", []),
])
def test_scanner_finds_torch_imports(tmp_path, source, expected):
    """The check above can fail: the scanner sees every way of importing torch, and nothing else."""
    f = tmp_path / "module.py"
    f.write_text(source, encoding="utf-8")
    assert torch_imports(f) == expected
