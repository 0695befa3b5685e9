"""CS-UNet hybrid (issue 14): starts as the U-Net, the Swin learns from step 1, encoder weights, any size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pretrain.export import export_encoder
from segment.models import CSUNetHybrid, create_model, is_model, list_models
from segment.weights import load_encoder_weights, load_model_encoders

HYBRID, UNET = "cs_unet_hybrid_test", "unet_test"
NEW_PARTS = ("swin.", "fusions.", "input_skip.")  # the hybrid's parameters a U-Net has not got
SIZES = [(64, 64), (96, 80), (100, 77), (33, 130)]
# The test Swin from stride 8, as cs_unet_hybrid_lite's Swin is (fusion at 8, 16, 32 only)
SWIN_S8 = dict(patch_size=8, embed_dim=48, depths=(2, 2, 2), num_heads=(2, 4, 8))
CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "model"


def _fresh(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name, **kwargs)


def copy_unet_into(hybrid: CSUNetHybrid, unet: torch.nn.Module) -> list[str]:
    """Load the U-Net's CNN, decoder and head into the hybrid; any other difference raises.

    Every U-Net tensor must land on a hybrid tensor of the same name and shape (load_state_dict
    raises on a shape mismatch), and the hybrid may have nothing else but its Swin branch, its
    fusion projections and its input skip.
    """
    state = unet.state_dict()
    result = hybrid.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise AssertionError(f"U-Net tensors with no place in the hybrid: {result.unexpected_keys}")
    foreign = [k for k in result.missing_keys if not k.startswith(NEW_PARTS)]
    if foreign:
        raise AssertionError(f"hybrid tensors outside {NEW_PARTS} not given by the U-Net: {foreign}")
    assert {k for k in hybrid.state_dict() if not k.startswith(NEW_PARTS)} == set(state)
    return list(state)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_starts_as_the_unet(in_chans: int) -> None:
    """At step 0 the hybrid's logits are the U-Net's (same CNN, decoder and head weights)."""
    unet = _fresh(UNET, seed=1, num_classes=4, in_chans=in_chans)
    hybrid = _fresh(HYBRID, seed=2, num_classes=4, in_chans=in_chans)
    copied = copy_unet_into(hybrid, unet)
    assert any(k.startswith("cnn.model.") for k in copied) and any(k.startswith("decoder.blocks.4.") for k in copied)
    assert any(k.startswith("segmentation_head.") for k in copied)
    assert hybrid.pad_multiple == unet.pad_multiple == 32 and hybrid.swin_pad_multiple == 64
    torch.manual_seed(3)
    x = torch.randn(2, in_chans, 100, 77)  # padded to 128 x 96 (CNN) and 128 x 128 (Swin)
    with torch.no_grad():
        for mode in ("eval", "train"):  # BatchNorm with running and with batch statistics
            getattr(unet, mode)(), getattr(hybrid, mode)()
            expected, got = unet(x), hybrid(x)
            assert got.shape == (2, 4, 100, 77)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # ... and the Swin branch really ran and is non-trivial: it only enters through zeros
    with torch.no_grad():
        swin = hybrid.forward_swin(torch.zeros(1, in_chans, 128, 96).normal_())
    assert [tuple(f.shape[1:3]) for f in swin] == [(32, 32), (16, 16), (8, 8), (4, 4)]
    assert all(f.abs().sum() > 0 for f in swin)


@pytest.mark.parametrize("kwargs, swin", [
    (dict(cnn_name="test_convnext"), {}),  # no stride-2 feature: a 0-channel stem skip
    (dict(decoder_interpolation="bilinear", pad_mode="reflect"), {}),  # the input skip's resize in bilinear
    # the last block, run after the resize, keeps its attention (scSE needs >= 16 channels)
    (dict(decoder_attention_type="scse", decoder_channels=(64, 32, 32, 32, 32)), {}),
    ({}, SWIN_S8),  # the Swin from stride 8 (cs_unet_hybrid_lite's layout): no fusion at stride 4
], ids=["convnext", "bilinear-reflect", "scse", "swin-stride8"])
def test_starts_as_the_unet_with_other_options(kwargs: dict, swin: dict) -> None:
    """Other CNNs, decoder options and Swin layouts keep the equality."""
    kwargs = dict(num_classes=3, in_chans=1, **kwargs)
    unet, hybrid = _fresh(UNET, seed=1, **kwargs), _fresh(HYBRID, seed=2, **kwargs, **swin)
    copy_unet_into(hybrid, unet)
    x = torch.randn(2, 1, 70, 90)
    with torch.no_grad():
        for mode in ("eval", "train"):
            getattr(unet, mode)(), getattr(hybrid, mode)()
            torch.testing.assert_close(hybrid(x), unet(x), atol=1e-5, rtol=0)
    if swin:
        assert len(hybrid.fusions) == 3 and hybrid.fusion_levels == [2, 3, 4]  # CNN strides 8, 16, 32
        with torch.no_grad():
            feats = hybrid.forward_swin(torch.randn(1, 1, 128, 96))
        assert [tuple(f.shape[1:3]) for f in feats] == [(16, 16), (8, 8), (4, 4)]


def test_copy_fails_loudly_on_a_mismatch() -> None:
    hybrid = _fresh(HYBRID)
    with pytest.raises(RuntimeError, match="size mismatch"):  # another decoder width
        copy_unet_into(hybrid, _fresh(UNET, decoder_channels=(32, 16, 16, 8, 4)))
    with pytest.raises(AssertionError, match="hybrid tensors outside"):  # a U-Net without a head
        unet = _fresh(UNET)
        del unet.segmentation_head
        copy_unet_into(hybrid, unet)


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def _nonzero(p: torch.nn.Parameter) -> bool:
    return p.grad is not None and bool(p.grad.abs().sum() > 0)


@pytest.mark.parametrize("kwargs", [{}, SWIN_S8], ids=["swin-stride4", "swin-stride8"])
def test_gradient_reaches_the_swin(kwargs: dict) -> None:
    """Step 0: the zero projections get a gradient (the Swin none); after one step the Swin does too."""
    model = _fresh(HYBRID, **kwargs).train()
    torch.manual_seed(4)
    x, y = torch.randn(2, 1, 96, 80), torch.randint(0, 3, (2, 96, 80))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

    _loss(model, x, y).backward()
    zero_init = [f.proj.weight for f in model.fusions] + [model.input_skip[1].weight]
    assert all(not p.abs().any() for p in zero_init)
    assert all(_nonzero(p) for p in zero_init)
    swin = [(n, p) for n, p in model.swin.named_parameters() if p.requires_grad]
    assert swin and all(p.grad is None or not p.grad.any() for _, p in swin)  # blocked by the zeros

    opt.step()
    opt.zero_grad(set_to_none=True)
    assert all(p.abs().any() for p in zero_init)
    _loss(model, x, y).backward()
    dead = [n for n, p in swin if not _nonzero(p)]
    assert not dead, f"Swin parameters without a gradient after one step: {dead}"
    assert _nonzero(model.input_skip[0][0].weight)  # the input skip's conv learns too


def test_every_parameter_gets_a_finite_gradient() -> None:
    model = _fresh(HYBRID, in_chans=3).train()
    loss = _loss(model, torch.randn(2, 3, 70, 50), torch.randint(0, 3, (2, 70, 50)))
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None or not torch.isfinite(p.grad).all()]
    assert torch.isfinite(loss) and not missing, missing


@pytest.mark.parametrize("in_chans", [1, 3])
def test_forward_any_size(in_chans: int) -> None:
    model = _fresh(HYBRID, num_classes=5, in_chans=in_chans).eval()
    with torch.no_grad():
        for fusion in model.fusions:  # let the Swin path count
            fusion.proj.weight.normal_(0, 0.1)
        for h, w in SIZES:
            y = model(torch.randn(2, in_chans, h, w))
            assert y.shape == (2, 5, h, w) and torch.isfinite(y).all()
    with pytest.raises(ValueError, match=rf"expects input of shape \(B, {in_chans}, H, W\)"):
        model(torch.randn(1, in_chans + 1, 64, 64))


def test_encoder_weights_load_into_both_branches(tmp_path: Path) -> None:
    """Pretrain exports (load_model_encoders) and plain timm state dicts (load_encoder_weights)."""
    model = _fresh(HYBRID, in_chans=1)
    assert set(model.encoders) == set(model.encoder_specs) == {"cnn", "swin"}
    assert model.encoders["cnn"] is model.cnn.model and model.encoders["swin"] is model.swin
    sources, expected = {}, {}
    for seed, (branch, spec) in enumerate(model.encoder_specs.items()):
        torch.manual_seed(10 + seed)
        src = timm.create_model(spec["timm_name"], **spec["timm_kwargs"])
        with torch.no_grad():
            for t in src.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
        expected[branch] = src.state_dict()
        kwargs = {k: v for k, v in spec["timm_kwargs"].items() if k not in ("num_classes", "in_chans")}
        sources[branch] = export_encoder(src, tmp_path / branch, timm_name=spec["timm_name"], timm_kwargs=kwargs,
                                         in_chans=1, mean=0.5, std=0.2)
    reports = load_model_encoders(model, sources)
    assert set(reports) == {"cnn", "swin"}
    for branch, report in reports.items():
        assert report.ok and not report.resized and not report.missing, report.summary()
        ours = model.encoders[branch].state_dict()
        assert all(torch.equal(ours[k], v) for k, v in expected[branch].items())

    # a timm state dict saved as .safetensors / .pth, one branch at a time
    fresh = _fresh(HYBRID, seed=5, in_chans=1)
    save_file(expected["swin"], tmp_path / "swin.safetensors")
    torch.save({"state_dict": expected["cnn"]}, tmp_path / "cnn.pth")
    for branch, path in (("swin", tmp_path / "swin.safetensors"), ("cnn", tmp_path / "cnn.pth")):
        spec = fresh.encoder_specs[branch]
        report = load_encoder_weights(fresh.encoders[branch], path, timm_name=spec["timm_name"], name=branch)
        assert report.ok and not report.missing, report.summary()
        assert all(torch.equal(fresh.encoders[branch].state_dict()[k], v) for k, v in expected[branch].items())
    with torch.no_grad():
        assert fresh(torch.randn(1, 1, 64, 64)).shape == (1, 3, 64, 64)


def test_config_rebuilds_the_model() -> None:
    model = _fresh(HYBRID, num_classes=5, in_chans=3, pad_mode="reflect")
    config = json.loads(json.dumps(model.config))
    assert config["name"] == HYBRID and config["num_classes"] == 5 and config["in_chans"] == 3
    rebuilt = create_model(**config)
    assert rebuilt.config == model.config
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)
    with torch.no_grad():
        assert rebuilt.eval()(torch.randn(1, 3, 37, 51)).shape == (1, 5, 37, 51)  # reflect pads 37 -> 64


def test_grad_checkpointing_gives_the_same_output() -> None:
    model = _fresh(HYBRID).eval()
    with torch.no_grad():
        for fusion in model.fusions:
            fusion.proj.weight.normal_(0, 0.1)
        x = torch.randn(1, 1, 64, 64)
        expected = model(x)
        model.set_grad_checkpointing(True)
        torch.testing.assert_close(model(x), expected, atol=1e-6, rtol=0)


def test_presets_match_the_cs_unet_and_unet_sizes() -> None:
    """Registry: hybrid presets with cs_unet's encoders and unet's decoder; paper aliases; configs."""
    assert list_models("cs_unet_hybrid*") == [
        "cs_unet_hybrid", "cs_unet_hybrid_intermediate", "cs_unet_hybrid_lite", "cs_unet_hybrid_test"
    ]
    assert list_models("cs_unet_paper*") == ["cs_unet_paper", "cs_unet_paper_intermediate", "cs_unet_paper_lite"]
    for name in ("cs_unet", "cs_unet_lite", "cs_unet_intermediate", "cs_unet_test"):  # old names stay
        assert is_model(name)
    for name in list_models(["cs_unet_hybrid*", "cs_unet_paper*"], exclude_filters="*_test"):
        yaml = (CONFIGS / f"{name}.yaml").read_text()
        assert f"name: {name}\n" in yaml and "model_schema" in yaml

    test = _fresh(HYBRID)
    ref = _fresh("cs_unet_test")
    assert test.encoder_specs["swin"] == ref.encoder_specs["swin"]
    assert test.encoder_specs["cnn"] == ref.encoder_specs["cnn"]
    # lite: cs_unet_lite's CNN; its Swin without the stride-4 stage (stages 2-4: 96-192-384, heads 4-8-16)
    lite = _fresh("cs_unet_hybrid_lite")
    paper_lite = _fresh("cs_unet_lite")
    assert lite.encoder_specs["cnn"] == paper_lite.encoder_specs["cnn"]
    swin = lite.encoder_specs["swin"]["timm_kwargs"]
    assert (swin["patch_size"], swin["embed_dim"], swin["depths"], swin["num_heads"]) == (8, 96, [2, 2, 2], [4, 8, 16])
    paper_swin = paper_lite.encoder_specs["swin"]["timm_kwargs"]
    assert {k: v for k, v in swin.items() if k not in ("patch_size", "embed_dim", "depths", "num_heads")} == {
        k: v for k, v in paper_swin.items() if k not in ("patch_size", "embed_dim", "depths", "num_heads")}
    unet = _fresh("unet_lite")
    unet_keys = {k: v.shape for k, v in unet.state_dict().items()}
    assert {k: v.shape for k, v in lite.state_dict().items() if not k.startswith(NEW_PARTS)} == unet_keys
    assert lite.fusion_levels == [2, 3, 4]  # CNN strides 8, 16, 32
    assert [f.proj.in_features for f in lite.fusions] == [96, 192, 384]
    assert [f.proj.out_features for f in lite.fusions] == [128, 256, 512]  # the CNN's widths: additive
    assert lite.swin_pad_multiple == 128 and lite.pad_multiple == 32
    # the paper-style lite Swin (from stride 4; what pretrain's swin_lite exports fit) is a config away
    s4 = _fresh("cs_unet_hybrid_lite", patch_size=4, embed_dim=48, depths=[2, 2, 2, 2], num_heads=[2, 4, 8, 16])
    assert s4.encoder_specs == paper_lite.encoder_specs
    assert [f.proj.in_features for f in s4.fusions] == [48, 96, 192, 384]
    assert [f.proj.out_features for f in s4.fusions] == [64, 128, 256, 512]

    paper = _fresh("cs_unet_paper_lite")
    old = _fresh("cs_unet_lite")
    assert paper.config == {**old.config, "name": "cs_unet_paper_lite"}
    assert {k: v.shape for k, v in paper.state_dict().items()} == {k: v.shape for k, v in old.state_dict().items()}


@pytest.mark.slow
def test_onnx_export_any_size(tmp_path: Path) -> None:
    """The Swin branch's extra padding stays symbolic in a trace: the export takes any H x W."""
    pytest.importorskip("onnxruntime")
    from segment.export import export_onnx

    model = _fresh(HYBRID, num_classes=3, in_chans=1).eval()
    with torch.no_grad():
        for fusion in model.fusions:
            fusion.proj.weight.normal_(0, 0.1)
    report = export_onnx(model, tmp_path / "m.onnx", tile_hw=(64, 64), in_chans=1, mean=[0.5], std=[0.25])
    assert report.dynamic_hw and report.max_abs_diff < 1e-4 and len(report.checked) == 4
