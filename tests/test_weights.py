"""segment.weights: every checkpoint format is made here, in tmp_path, from tiny timm models."""
from __future__ import annotations

import json
import logging
import re
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from pretrain.export import ENCODER_FILE, ENCODER_META, export_encoder
from segment.weight_formats import read_checkpoint
from segment.weights import LoadReport, WeightsMismatchError, load_encoder_weights, load_model_encoders

SWIN = "swin_tiny_patch4_window7_224"


def swin(window: int = 8, in_chans: int = 1, embed_dim: int = 24, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(
        SWIN, embed_dim=embed_dim, depths=(2, 2, 1, 1), num_heads=(1, 2, 4, 8), window_size=window,
        img_size=64, num_classes=0, strict_img_size=False, in_chans=in_chans,
    )


def resnet(name: str = "resnet18", in_chans: int = 1, seed: int = 0, num_classes: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans)


def randomize(model: nn.Module) -> nn.Module:
    """Fill every float tensor (BN statistics included) with distinct values."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn_like(t))
    return model


def assert_same(model: nn.Module, state: dict[str, torch.Tensor], keys=None) -> None:
    ours = model.state_dict()
    for k in keys if keys is not None else state:
        assert torch.equal(ours[k], state[k]), k


def to_microsoft(timm_state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Inverse of timm's swin checkpoint_filter_fn: downsampling belongs to the previous stage,
    buffers are persistent, the classifier is `head`."""
    out: dict[str, torch.Tensor] = {}
    for k, v in timm_state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k] = v.clone()
    for k, buf in model.named_buffers():
        if k.endswith("relative_position_index"):
            out[k] = buf.clone()
    for i, stage in enumerate(model.layers):
        for j, block in enumerate(stage.blocks):
            if any(block.shift_size):
                ws = block.window_size[0] * block.window_size[1]
                grid = (64 // 4) // 2**i
                windows = (grid // block.window_size[0]) ** 2
                out[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(windows, ws, ws)
    width = model.num_features
    out["head.weight"] = torch.randn(1000, width)
    out["head.bias"] = torch.randn(1000)
    return out


# ----------------------------------------------------------------------------------------------


def test_export_round_trip(tmp_path: Path) -> None:
    src = randomize(swin(seed=1))
    kwargs = dict(embed_dim=24, depths=[2, 2, 1, 1], num_heads=[1, 2, 4, 8], window_size=8, img_size=64)
    out = export_encoder(src, tmp_path / "exp", timm_name=SWIN, timm_kwargs=kwargs, in_chans=1,
                         mean=0.5, std=[0.25], method="dino", data="synthetic", steps=10)
    assert sorted(p.name for p in out.iterdir()) == [ENCODER_META, ENCODER_FILE]  # no temp files left
    meta = json.loads((out / ENCODER_META).read_text())
    assert meta["timm_name"] == SWIN and meta["timm_kwargs"] == kwargs and meta["in_chans"] == 1
    assert meta["mean"] == [0.5] and meta["std"] == [0.25] and meta["steps"] == 10
    assert meta["feature_channels"] == [24, 48, 96, 192] and meta["feature_strides"] == [4, 8, 16, 32]
    assert meta["version"] and meta["date"] and meta["method"] == "dino"

    for source in (out, out / ENCODER_FILE, str(out)):
        state, rmeta = read_checkpoint(source)
        assert rmeta["format"] == "export" and rmeta["timm_name"] == SWIN
        assert state.keys() == src.state_dict().keys()
    rebuilt = timm.create_model(meta["timm_name"], num_classes=0, in_chans=meta["in_chans"],
                                strict_img_size=False, **meta["timm_kwargs"])
    report = load_encoder_weights(rebuilt, out)
    assert isinstance(report, LoadReport) and report.ok
    assert report.loaded == list(src.state_dict())
    assert not (report.resized or report.missing or report.unexpected or report.skipped_head
                or report.shape_mismatch)
    assert_same(rebuilt, src.state_dict())
    assert "loaded" in report.summary()
    with pytest.raises(ValueError, match="mean has 2 values"):
        export_encoder(src, tmp_path / "bad", timm_name=SWIN, timm_kwargs=kwargs, in_chans=1,
                       mean=[0.5, 0.5], std=0.2)


def test_timm_pth_wrapped_with_module_prefix(tmp_path: Path) -> None:
    src = randomize(resnet(in_chans=3, num_classes=10, seed=1))  # with a classifier: dropped
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in src.state_dict().items()},
                "optimizer": {"lr": 0.1}}, path)
    state, meta = read_checkpoint(path)
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)
    enc = resnet(in_chans=3)
    report = load_encoder_weights(enc, path)
    assert report.ok and sorted(report.skipped_head) == ["fc.bias", "fc.weight"]
    assert not report.missing and not report.resized
    assert_same(enc, src.state_dict(), keys=enc.state_dict().keys())


def test_microsoft_swin_into_other_window_and_channels(tmp_path: Path) -> None:
    src = randomize(swin(window=4, in_chans=3, seed=1))
    path = tmp_path / "swin_tiny_microlite.pth"
    torch.save({"model": to_microsoft(src.state_dict(), src), "epoch": 300}, path)
    state, meta = read_checkpoint(path)
    assert meta["format"] == "microsoft_swin" and "layers.0.downsample.reduction.weight" in state

    enc = swin(window=8, in_chans=1)
    report = load_encoder_weights(enc, path, name="swin")
    tables = [k for k in enc.state_dict() if k.endswith("relative_position_bias_table")
              and enc.state_dict()[k].shape != src.state_dict()[k].shape]
    assert len(tables) == 4  # stages 0 and 1: windows 4 -> 8 (49 -> 225 rows)
    assert sorted(report.resized) == sorted([*tables, "patch_embed.proj.weight"])
    assert report.ok and sorted(report.skipped_head) == ["head.fc.bias", "head.fc.weight"]
    assert len(report.loaded) == len(enc.state_dict())
    same = [k for k in enc.state_dict() if k not in report.resized]
    assert_same(enc, src.state_dict(), keys=same)  # downsample moved back to timm's stage
    assert torch.allclose(enc.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    assert enc(torch.randn(1, 1, 64, 64)).shape == (1, 192)


def test_micronet_pth_tar_into_timm_resnet(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(2)
    tv = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18_pretrained_microscopynet_v1.0.pth.tar"
    torch.save(tv.state_dict(), path, _use_new_zipfile_serialization=False)  # legacy, as in 2021
    enc = resnet(in_chans=3)
    report = load_encoder_weights(enc, path)
    assert read_checkpoint(path)[1]["format"] == "micronet"
    assert report.ok and not report.missing and sorted(report.skipped_head) == ["fc.bias", "fc.weight"]
    assert_same(enc, tv.state_dict(), keys=enc.state_dict().keys())

    wrapped = tmp_path / "wrapped_microscopynet.pth.tar"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tv.state_dict().items()}}, wrapped)
    assert load_encoder_weights(resnet(in_chans=3), wrapped).ok


def test_stem_adapts_between_rgb_and_gray(tmp_path: Path) -> None:
    rgb = randomize(resnet(in_chans=3, seed=1))
    save_file(rgb.state_dict(), str(tmp_path / "rgb.safetensors"))
    gray = resnet(in_chans=1)
    report = load_encoder_weights(gray, tmp_path / "rgb.safetensors")
    assert report.ok and report.resized == ["conv1.weight"]
    assert torch.allclose(gray.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))

    export_encoder(gray, tmp_path / "gray", timm_name="resnet18", timm_kwargs={}, in_chans=1,
                   mean=0.5, std=0.25)
    back = resnet(in_chans=3)
    report = load_encoder_weights(back, tmp_path / "gray")
    assert report.ok and report.resized == ["conv1.weight"]
    assert torch.allclose(back.conv1.weight, gray.conv1.weight.repeat(1, 3, 1, 1) / 3)


def test_mismatch_raises_then_loads_when_allowed(tmp_path: Path, caplog) -> None:
    src = randomize(resnet("resnet34", seed=1))
    path = tmp_path / "r34.pth"
    torch.save(src.state_dict(), path)
    enc = resnet("resnet18")
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    with pytest.raises(WeightsMismatchError, match="allow_mismatch=True") as info:
        load_encoder_weights(enc, path, name="cnn")
    msg = str(info.value)
    assert str(path) in msg and "'cnn'" in msg and "unexpected" in msg and "layer1.2." in msg
    assert_same(enc, before)  # untouched on error

    report = load_encoder_weights(enc, path, allow_mismatch=True)
    assert report.unexpected and report.loaded and not report.missing and not report.ok
    assert_same(enc, src.state_dict(), keys=report.loaded)

    state = resnet("resnet18", seed=1).state_dict()
    del state["layer4.1.conv2.weight"]
    state["layer1.0.bn1.weight"] = torch.ones(32)
    save_file(state, str(tmp_path / "holes.safetensors"))
    with pytest.raises(WeightsMismatchError, match="1 missing.*1 shape mismatch"):
        load_encoder_weights(resnet("resnet18"), tmp_path / "holes.safetensors")
    report = load_encoder_weights(resnet("resnet18"), tmp_path / "holes.safetensors", allow_mismatch=True)
    assert report.missing == ["layer4.1.conv2.weight"]
    assert report.shape_mismatch == ["layer1.0.bn1.weight: checkpoint (32,) vs encoder (64,)"]

    # metadata of an export that disagrees with the encoder is reported
    export_encoder(swin(), tmp_path / "exp", timm_name=SWIN, timm_kwargs={}, in_chans=1, mean=0.5, std=0.2)
    with caplog.at_level(logging.WARNING, logger="segment.weights"):
        load_encoder_weights(swin(embed_dim=32), tmp_path / "exp", allow_mismatch=True)
    assert "feature_channels" in caplog.text


class NotATensor:
    """Anything weights_only refuses to unpickle."""


def test_refuses_pickled_objects_and_corrupt_files(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"state_dict": resnet().state_dict(), "obj": NotATensor()}, evil)
    with pytest.raises(ValueError, match=r"refusing to load .*evil\.pth.*NotATensor"):
        read_checkpoint(evil)
    for name, data in (("junk.pth", b"\x80\x03not a pickle" * 20), ("empty.pt", b""),
                       ("trunc.safetensors", b"\x10\x00\x00"), ("x.bin", bytes(range(256)))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=re.escape(name)):
            read_checkpoint(tmp_path / name)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="list.pt holds a list"):
        read_checkpoint(tmp_path / "list.pt")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="folder without encoder.safetensors"):
        read_checkpoint(tmp_path / "folder")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_checkpoint(tmp_path / "nope.pth")


def test_url_download_is_cached_or_explains(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MSEG_CACHE", str(tmp_path / "cache"))
    state = resnet().state_dict()
    calls = []

    def fake_download(url: str, dst: str, progress: bool = True) -> None:
        calls.append(url)
        torch.save(state, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    url = "https://example.org/weights/r18.pth"
    for _ in range(2):
        got, meta = read_checkpoint(url)
        assert got.keys() == state.keys() and meta["path"] == str(tmp_path / "cache" / "r18.pth")
    assert calls == [url] and [p.name for p in (tmp_path / "cache").iterdir()] == ["r18.pth"]

    def offline(url: str, dst: str, progress: bool = True) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(OSError, match="download it manually and pass the local path"):
        read_checkpoint("https://example.org/other.pth")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["r18.pth"]


def test_load_model_encoders(tmp_path: Path) -> None:
    model = nn.Module()
    model.encoders = nn.ModuleDict({"swin": swin(), "cnn": resnet()})
    model.encoder_specs = {"swin": {"timm_name": SWIN, "timm_kwargs": {}},
                           "cnn": {"timm_name": "resnet18", "timm_kwargs": {}}}
    src = randomize(resnet(seed=3))
    export_encoder(src, tmp_path / "cnn", timm_name="resnet18", timm_kwargs={}, in_chans=1, mean=0.5, std=0.2)
    reports = load_model_encoders(model, {"cnn": tmp_path / "cnn", "swin": None})
    assert list(reports) == ["cnn"] and reports["cnn"].ok and reports["cnn"].name == "cnn"
    assert_same(model.encoders["cnn"], src.state_dict())
    with pytest.raises(ValueError, match=r"unknown encoder branch.*'vit'.*available: \['cnn', 'swin'\]"):
        load_model_encoders(model, {"vit": tmp_path / "cnn"})


def test_cs_unet_branches(tmp_path: Path) -> None:
    models = pytest.importorskip("segment.models")
    if not hasattr(models, "create_model"):
        pytest.skip("segment.models.create_model not available yet")
    try:
        model = models.create_model("cs_unet_test", num_classes=3, in_chans=1, img_size=64)
    except (KeyError, ValueError) as e:
        pytest.skip(f"cs_unet_test preset not available: {e}")
    sources, expected = {}, {}
    for branch, spec in model.encoder_specs.items():
        kwargs = {"num_classes": 0, "in_chans": 1, **spec["timm_kwargs"]}
        src = randomize(timm.create_model(spec["timm_name"], **kwargs))
        sources[branch] = export_encoder(
            src, tmp_path / branch, timm_name=spec["timm_name"], timm_kwargs=spec["timm_kwargs"],
            in_chans=kwargs["in_chans"], mean=0.5, std=0.2,
        )
        expected[branch] = src.state_dict()
    reports = load_model_encoders(model, sources)
    for branch, report in reports.items():
        assert report.ok and not report.resized, report.summary()
        assert_same(model.encoders[branch], expected[branch])
    with torch.no_grad():
        assert model(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)
