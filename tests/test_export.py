"""segment.export: ONNX / TorchScript round trips against PyTorch."""
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from segment.export import PaddedForExport, export_onnx, export_torchscript, main  # noqa: E402
from segment.models import create_model  # noqa: E402

KW = dict(tile_hw=(64, 64), in_chans=1, mean=[0.5], std=[0.25])


def run_onnx(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": x.numpy()})[0]


@pytest.mark.parametrize("name", ["unet_test", "cs_unet_test"])
def test_onnx_round_trip_any_size(tmp_path, name):
    import onnx

    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=64).eval()
    report = export_onnx(model, tmp_path / "m.onnx", metadata={"model": name, "class_names": ["a", "b", "c"]}, **KW)
    assert report.dynamic_hw and report.max_abs_diff < 1e-4 and len(report.checked) == 4
    # an independent size and batch, not among the export's own checks
    x = torch.randn(3, 1, 70, 45)
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(run_onnx(tmp_path / "m.onnx", x), ref, atol=1e-4, rtol=0)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["model"] == name and json.loads(props["class_names"]) == ["a", "b", "c"]
    assert props["input_hw"] == "dynamic" and json.loads(props["mean"]) == [0.5]
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # atomic: no temporary left


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("name", ["unet_test", pytest.param("cs_unet_test", marks=pytest.mark.slow)])
def test_torchscript_round_trip(tmp_path, name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=3, in_chans=1, img_size=64).eval()
    report = export_torchscript(model, tmp_path / "m.pt", **KW)
    assert report.max_abs_diff < 1e-4
    loaded = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randn(2, 1, 50, 77)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-4, rtol=0)


class FixedSize(nn.Module):
    """Downsample, then resize back with Python ints: a trace bakes the size in."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, stride=2, padding=1)

    def forward(self, x):
        h, w = int(x.shape[-2]), int(x.shape[-1])
        return F.interpolate(self.conv(x), size=(h, w), mode="bilinear", align_corners=False)


def test_onnx_falls_back_to_fixed_tile_size(tmp_path):
    torch.manual_seed(0)
    model = FixedSize().eval()
    report = export_onnx(model, tmp_path / "f.onnx", **KW)
    assert not report.dynamic_hw and report.max_abs_diff < 1e-5
    x = torch.randn(5, 1, 64, 64)  # dynamic batch still
    with torch.no_grad():
        np.testing.assert_allclose(run_onnx(tmp_path / "f.onnx", x), model(x).numpy(), atol=1e-5)


def test_padded_wrapper_matches_model():
    torch.manual_seed(0)
    model = create_model("unet_test", num_classes=2, in_chans=1, img_size=64).eval()
    wrapped = PaddedForExport(model)
    assert wrapped.multiple == model.pad_multiple
    x = torch.randn(1, 1, 37, 51)
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x), model(x))
    with pytest.raises(ValueError):
        PaddedForExport(model, mode="wrap")


def test_cli(tmp_path, capsys):
    from segment.checkpoint import save_model

    torch.manual_seed(0)
    kwargs = dict(num_classes=3, in_chans=1, img_size=64)
    ckpt = save_model(tmp_path / "ckpt", create_model("unet_test", **kwargs),
                      dict(model="unet_test", model_kwargs=kwargs, class_names=["a", "b", "c"], tile_size=64,
                           in_chans=1, mean=[0.5], std=[0.25], intensity="percentile", zoom=0.5))
    assert main([str(ckpt), "--onnx", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max |diff| vs PyTorch" in out and (tmp_path / "m.onnx").is_file()
    import onnx

    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["zoom"] == "0.5" and props["intensity"] == "percentile"  # the pre-processing a runtime repeats
    with pytest.raises(SystemExit, match="nothing to do"):
        main([str(ckpt)])
