"""segment.onnx_backend and predict --backend onnx: the same masks as PyTorch, bounded memory, clear errors."""
import csv
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from pretrain.synthetic_materials import superalloy  # noqa: E402
from segment.checkpoint import save_model  # noqa: E402
from segment.infer import Predictor  # noqa: E402
from segment.models import create_model  # noqa: E402
from segment.onnx_backend import OnnxModule, onnx_predictor, require_onnxruntime  # noqa: E402
from segment.predict import main  # noqa: E402
from segment.sources import ArraySource  # noqa: E402
from segment.stream import iter_logit_rows, predict_stream  # noqa: E402

NAMES = ["matrix", "secondary", "tertiary"]
COLORS = [[0, 0, 0], [0, 0, 255], [255, 0, 0]]
KW = dict(num_classes=3, in_chans=1, img_size=64)


def make_checkpoint(path, seed):
    torch.manual_seed(seed)
    model = create_model("unet_test", **KW)
    return save_model(path, model, dict(model="unet_test", model_kwargs=KW, class_names=NAMES, colors=COLORS,
                                        tile_size=64, in_chans=1, mean=[0.5], std=[0.25], intensity="zscore"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "best", seed=0)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory, checkpoint):
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    onnx_predictor(checkpoint, path)
    return path


def test_stream_logits_and_labels_match_torch(checkpoint, onnx_file):
    image = superalloy((150, 203), seed=3)[0]  # not a multiple of the tile: border tiles, odd width
    torch_pred = Predictor.from_checkpoint(checkpoint, batch_size=3)
    onnx_pred = onnx_predictor(checkpoint, onnx_file, batch_size=3)
    assert isinstance(onnx_pred.model, OnnxModule) and not isinstance(torch_pred.model, OnnxModule)
    ref = torch.cat([b for _, b in iter_logit_rows(torch_pred, ArraySource(image))], 1)
    got = torch.cat([b for _, b in iter_logit_rows(onnx_pred, ArraySource(image))], 1)
    assert got.shape == ref.shape == (3, 150, 203)
    assert float((got - ref).abs().max()) < 1e-4
    agree = (predict_stream(onnx_pred, image) == predict_stream(torch_pred, image)).mean()
    assert agree >= 0.999


def test_existing_file_is_checked_and_reused(tmp_path, checkpoint, onnx_file):
    copy = tmp_path / "reuse.onnx"
    copy.write_bytes(onnx_file.read_bytes())
    mtime = copy.stat().st_mtime_ns
    onnx_predictor(checkpoint, copy)
    assert copy.stat().st_mtime_ns == mtime  # reused, not exported again
    other = make_checkpoint(tmp_path / "other", seed=1)  # another model: its logits differ
    with pytest.raises(ValueError, match="reuse.onnx.*differ"):
        onnx_predictor(other, copy)
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.onnx"):
        onnx_predictor(checkpoint, junk)


def test_cpu_float32_only(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="CPU"):
        onnx_predictor(checkpoint, tmp_path / "m.onnx", device="cuda")
    with pytest.raises(ValueError, match="float32"):
        onnx_predictor(checkpoint, tmp_path / "m.onnx", amp_dtype=torch.bfloat16)
    assert not (tmp_path / "m.onnx").exists()


def test_missing_onnxruntime_says_how_to_install(monkeypatch, tmp_path, checkpoint):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install"):
        require_onnxruntime()
    Image.fromarray(superalloy((70, 70), seed=1)[0]).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match=r"onnxruntime.*pip install"):
        main([str(checkpoint), str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), "--backend", "onnx",
              "--no-progress"])


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_cli_onnx_backend_same_masks_and_resume(tmp_path, checkpoint):
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        Image.fromarray(superalloy((90 + 20 * i, 130), seed=i)[0]).save(inp / f"img{i}.png")
    common = [str(checkpoint), str(inp), "--no-progress", "--no-overlays"]
    assert main([*common, "--out", str(tmp_path / "pt")]) == 0
    assert main([*common, "--out", str(tmp_path / "ox"), "--backend", "onnx"]) == 0
    assert (tmp_path / "ox" / "model.onnx").is_file()
    for key in ("img0", "img1"):
        a = np.asarray(Image.open(tmp_path / "pt" / "masks" / f"{key}.png"))
        b = np.asarray(Image.open(tmp_path / "ox" / "masks" / f"{key}.png"))
        assert a.shape == b.shape and (a == b).mean() >= 0.999
    assert "onnxruntime" in (tmp_path / "ox" / "README.md").read_text()
    # a rerun resumes (records match); the torch folder's records do not count for the ONNX backend
    records = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ox" / "records").iterdir()}
    assert main([*common, "--out", str(tmp_path / "ox"), "--backend", "onnx"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ox" / "records").iterdir()} == records
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pt" / "records").iterdir()}
    assert main([*common, "--out", str(tmp_path / "pt"), "--backend", "onnx"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "pt" / "records").iterdir()}
    assert all(after[k] != before[k] for k in before)  # redone with the other backend
    assert len(read_csv(tmp_path / "ox" / "images.csv")) == 2


def test_onnx_file_needs_onnx_backend(tmp_path, checkpoint):
    with pytest.raises(SystemExit, match="--backend onnx"):
        main([str(checkpoint), str(tmp_path), "--out", str(tmp_path / "o"), "--onnx-file", str(tmp_path / "m.onnx")])
