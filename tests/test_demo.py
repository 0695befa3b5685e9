"""segment.demo's pretraining step (the `make demo` path through pretrain.train), at the smallest size."""
from __future__ import annotations

import json

import segment.demo as demo


def test_demo_pretrains_one_encoder_per_branch_and_exports_them(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "PRETRAIN_COMMON", [*demo.PRETRAIN_COMMON, "optim.epochs=1", "optim.steps_per_epoch=1",
                                                  "knn.every=0", "checkpoint.every=0"])
    monkeypatch.setattr(demo, "PRETRAIN", {branch: ("resnet_test" if branch == "cnn" else "swin_test", extra)
                                           for branch, (_, extra) in demo.PRETRAIN.items()})
    exports, results = demo.pretrain_encoders(tmp_path)
    assert set(exports) == {"cnn", "swin"}
    assert all(r["stopped"] == "completed" for r in results.values())
    for branch, path in exports.items():
        meta = json.loads((path / "encoder.json").read_text())
        assert meta["method"] == "dino" and meta["steps"] == 1
        assert ("resnet" in meta["timm_name"]) == (branch == "cnn")
