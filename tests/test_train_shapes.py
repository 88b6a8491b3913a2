"""The training script of the shipped model: its losses, and a tiny end-to-end run."""

import json
import math
import os

import torch

from tools import train_shapes


def test_bce_loss_matches_hand_formula():
    torch.manual_seed(0)
    logits = torch.randn(3, 8)
    labels = torch.tensor([[2, 2], [0, 5], [7, 1]])  # a single-class image repeats its label
    eps = 0.1
    got = train_shapes.classification_loss(logits, labels, "bce", eps)
    want = 0.0
    for i in range(3):
        pos = set(labels[i].tolist())
        for c in range(8):
            t = (1 - eps) * (c in pos) + eps / 2
            p = 1 / (1 + math.exp(-float(logits[i, c])))
            want -= t * math.log(p) + (1 - t) * math.log(1 - p)
    assert abs(float(got) - want / 3) < 1e-5


def test_softmax_loss_uses_half_half_pair_targets():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]])
    labels = torch.tensor([[0, 0], [1, 2]])
    got = train_shapes.classification_loss(logits, labels, "softmax", 0.0)
    lsm = logits.log_softmax(-1)
    want = (-lsm[0, 0] - 0.5 * (lsm[1, 1] + lsm[1, 2])) / 2
    assert torch.allclose(got, want)


def test_tiny_run_writes_loadable_weights(tmp_path):
    cfg = train_shapes.main([
        "--out", str(tmp_path / "out"), "--log-dir", str(tmp_path / "logs"), "--name", "tiny",
        "--train-seed", "5", "--n-train", "12", "--steps", "2", "--batch-size", "4",
        "--val-size", "4", "--embed-dim", "24", "--num-heads", "2", "--depth", "3", "--workers", "1",
        "--easy-frac", "0", "--easy-only-frac", "0", "--eval-every", "0", "--warmup", "1",
        "--loss", "bce", "--aux-blocks", "3", "--no-bf16", "--drop-path", "0.1",
    ])
    assert cfg["training"]["steps"] == 2 and cfg["training"]["loss"] == "bce"
    # stochastic depth is a training setting only: the shipped config builds the model without it
    assert cfg["training"]["drop_path"] == 0.1 and "drop_path_rate" not in cfg["model_kwargs"]
    saved = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert saved["sha256"] == cfg["sha256"]
    assert saved["training_seeds"] == [5]
    state = torch.load(tmp_path / "out" / "tiny.pth", weights_only=True)
    assert all(v.dtype == torch.float16 for v in state.values() if torch.is_floating_point(v))
    # the auxiliary heads are training-only: nothing but the timm model is saved
    assert not any(k.startswith(("aux", "deep")) for k in state)
    # the log goes to --log-dir, never next to the weights (the package folder ships weights and config only)
    assert (tmp_path / "logs" / "tiny_train_log.txt").read_text().count("held-out accuracy") == 2
    assert sorted(os.listdir(tmp_path / "out")) == ["tiny.json", "tiny.pth"]


def test_training_seeds_carry_over_from_the_init_weights(tmp_path):
    assert train_shapes._parent_training_seeds(None) == []
    assert train_shapes._parent_training_seeds(str(tmp_path / "no_json.pth")) == []
    (tmp_path / "parent.json").write_text(json.dumps({"training_seeds": [0, 3]}))
    assert train_shapes._parent_training_seeds(str(tmp_path / "parent.pth")) == [0, 3]
    (tmp_path / "old.json").write_text(json.dumps({"dataset": {"train": {"seed": 7}}}))  # before training_seeds
    assert train_shapes._parent_training_seeds(str(tmp_path / "old.pth")) == [7]
