"""segment.models: registry, shapes at any size, gradients, encoders, mirror init, paper-size presets."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from timm.models.swin_transformer import SwinTransformerBlock

from segment.models import create_model, list_models, pad_to_multiple

TEST_MODELS = list_models("*_test")
SIZES = [(64, 64), (96, 80), (100, 77)]


def _fresh(name: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **kwargs)


def test_registry_lists_every_family() -> None:
    assert TEST_MODELS == ["cs_unet_hybrid_test", "cs_unet_test", "swin_unet_test", "unet_test", "unetplusplus_test"]
    for name in ["cs_unet", "cs_unet_intermediate", "cs_unet_lite", "cs_unet_paper", "cs_unet_paper_intermediate",
                 "cs_unet_paper_lite", "cs_unet_hybrid", "cs_unet_hybrid_lite", "swin_unet", "swin_unet_lite",
                 "unet", "unet_lite", "unetplusplus", "unetplusplus_lite"]:
        assert name in list_models()
    paper = list_models("cs_unet*", exclude_filters=["*_test", "cs_unet_hybrid*", "cs_unet_paper*"])
    assert paper == ["cs_unet", "cs_unet_intermediate", "cs_unet_lite"]


def test_unknown_name_lists_available_models() -> None:
    expected = r"Unknown model 'cs_unet_tset'.*Did you mean 'cs_unet_test'.*Available models: cs_unet, .*unetplusplus"
    with pytest.raises(ValueError, match=expected):
        create_model("cs_unet_tset")


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", TEST_MODELS)
def test_forward_any_size(name: str, in_chans: int) -> None:
    model = _fresh(name, num_classes=4, in_chans=in_chans).eval()
    with torch.no_grad():
        for h, w in SIZES:
            y = model(torch.randn(2, in_chans, h, w))
            assert y.shape == (2, 4, h, w)
            assert torch.isfinite(y).all()


def _assert_backward(model: torch.nn.Module, in_chans: int = 1, size: tuple[int, int] = (96, 80)) -> None:
    model.train()
    y = model(torch.randn(2, in_chans, *size))
    loss = torch.nn.functional.cross_entropy(y, torch.randint(0, y.shape[1], (2, *size)))
    loss.backward()
    assert torch.isfinite(loss)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, p in trainable if not torch.isfinite(p.grad).all()]
    assert not bad, f"non-finite gradient for {bad}"


@pytest.mark.parametrize("name", TEST_MODELS)
def test_backward_every_parameter_gets_a_gradient(name: str) -> None:
    _assert_backward(_fresh(name))


@pytest.mark.parametrize("cnn_name", ["test_efficientnet", "test_convnext"])
@pytest.mark.parametrize("name", ["cs_unet_test", "unet_test", "unetplusplus_test"])
def test_non_resnet_cnn(name: str, cnn_name: str) -> None:
    """EfficientNet (stride-2 features, unused conv_head) and ConvNeXt (no stride-2 feature) work too."""
    model = _fresh(name, cnn_name=cnn_name, in_chans=3)
    assert model.encoder_specs["cnn"]["timm_name"] == cnn_name
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 100, 77)).shape == (1, 3, 100, 77)
    _assert_backward(model, in_chans=3)


@pytest.mark.parametrize("name", TEST_MODELS)
def test_encoders_are_full_timm_models(name: str) -> None:
    model = _fresh(name, in_chans=3)
    expected = {"cs_unet_test": {"swin", "cnn"}, "cs_unet_hybrid_test": {"swin", "cnn"},
                "swin_unet_test": {"swin"}}.get(name, {"cnn"})
    assert set(model.encoders) == set(model.encoder_specs) == expected
    for branch, encoder in model.encoders.items():
        spec = model.encoder_specs[branch]
        reference = timm.create_model(spec["timm_name"], **spec["timm_kwargs"])
        assert type(encoder) is type(reference)
        ours, theirs = encoder.state_dict(), reference.state_dict()
        assert list(ours) == list(theirs)
        assert all(ours[k].shape == theirs[k].shape for k in ours)
        encoder.load_state_dict(theirs)  # strict: timm weights load as they are


@pytest.mark.parametrize("name", TEST_MODELS)
def test_config_rebuilds_the_model(name: str) -> None:
    model = _fresh(name, num_classes=5, in_chans=3, pad_mode="reflect")
    config = json.loads(json.dumps(model.config))
    assert config["name"] == name and config["num_classes"] == 5 and config["in_chans"] == 3
    rebuilt = create_model(**config)
    assert rebuilt.config == model.config
    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert list(ours) == list(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def test_mirror_init_really_copies() -> None:
    model = _fresh("cs_unet_test")
    lines = model.init_decoder_from_encoder()
    n_tensors = sum(len(b.state_dict()) for s in model.decoder.stages for b in s.swin.blocks)
    assert len(lines) == n_tensors and all(": loaded" in line for line in lines)
    for stage in model.decoder.stages:  # decoder stage for level l mirrors encoder stage l
        for j, block in enumerate(stage.swin.blocks):
            source = model.swin.layers[stage.level].blocks[j]
            assert torch.equal(block.attn.qkv.weight, source.attn.qkv.weight)
            assert torch.equal(block.mlp.fc2.bias, source.mlp.fc2.bias)
    assert [s.level for s in model.decoder.stages] == [2, 1, 0]


@pytest.mark.filterwarnings("ignore::UserWarning")  # timm's table interpolation warns about torch internals
def test_mirror_init_resizes_tables_for_another_window() -> None:
    model = _fresh("cs_unet_test", decoder_window_size=2)
    lines = model.init_decoder_from_encoder()
    resized = [line for line in lines if "relative_position_bias_table" in line]
    assert resized and all("resized (49, " in line and "-> (9, " in line for line in resized)
    assert all(": loaded" in line for line in lines if line not in resized)


def test_padding_keeps_shifted_windows_exact() -> None:
    """Every shifted-window block sees a feature map that is an exact multiple of its window."""
    model = _fresh("cs_unet_test").eval()
    seen = []

    def check(block: SwinTransformerBlock, args: tuple[torch.Tensor]) -> None:
        H, W = args[0].shape[1:3]
        if any(block.shift_size):
            seen.append((H, W))
            assert H % block.window_size[0] == 0 and W % block.window_size[1] == 0

    for m in model.modules():
        if isinstance(m, SwinTransformerBlock):
            m.register_forward_pre_hook(check)
    with torch.no_grad():
        for h, w in SIZES:
            model(torch.randn(1, 1, h, w))
    assert seen and model.pad_multiple == 64


def test_grad_checkpointing_gives_the_same_output() -> None:
    model = _fresh("cs_unet_test").eval()
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        expected = model(x)
        model.set_grad_checkpointing(True)
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_bad_arguments_raise_clear_errors() -> None:
    model = _fresh("unet_test", in_chans=1)
    with pytest.raises(ValueError, match=r"expects input of shape \(B, 1, H, W\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("cs_unet_test", num_heads=(5, 2, 4, 8))
    with pytest.raises(ValueError, match=r"no features at stride\(s\) \[32\]"):
        create_model("unet_test", cnn_kwargs={"output_stride": 16})
    with pytest.raises(ValueError, match="pad_mode"):
        create_model("swin_unet_test", pad_mode="wrap")
    with pytest.raises(ValueError, match="decoder_window_size must be a positive int"):
        create_model("cs_unet_test", decoder_window_size=0)
    with pytest.raises(ValueError, match="decoder must be one of"):
        create_model("unet_test", decoder="fpn")
    with pytest.raises(TypeError, match="embed_dims"):  # a misspelt Swin argument is not silently dropped
        create_model("cs_unet_test", embed_dims=32)
    with pytest.raises(TypeError, match="embed_dims"):
        create_model("cs_unet_hybrid_test", embed_dims=32)
    with pytest.raises(ValueError, match="decoder is U-Net's"):
        create_model("cs_unet_hybrid_test", decoder="unetplusplus")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        create_model("cs_unet_hybrid_test", num_heads=(5, 2, 4, 8))


def test_presets_are_registered_under_their_names_with_their_docs() -> None:
    from segment.models import model_entrypoint

    for name in list_models():
        fn = model_entrypoint(name)
        assert fn.__name__ == name and fn.__doc__, name
        assert create_model.__module__ != fn.__module__  # filed by the family module that defines it
    assert model_entrypoint("cs_unet_hybrid_lite").__module__ == "segment.models.cs_unet_hybrid"


@pytest.mark.parametrize("mode", ["constant", "reflect", "replicate"])
def test_pad_to_multiple(mode: str) -> None:
    x = torch.randn(1, 2, 5, 3)
    y = pad_to_multiple(x, 16, mode)
    assert y.shape == (1, 2, 16, 16) and torch.equal(y[..., :5, :3], x)
    assert pad_to_multiple(y, 16, mode) is y


def test_paper_size_cs_unet_matches_the_design_table() -> None:
    """cs_unet at 512 x 512: the shapes of DESIGN.md section 3 and the parameter counts."""
    model = _fresh("cs_unet").eval()
    n_params = sum(p.numel() for p in model.parameters())
    assert 66e6 < n_params < 72e6, n_params  # 68.5 M; the authors' extra MLP layer adds ~3.1 M (72 M)
    shapes = {}
    stages = [("D0", model.decoder.bottleneck)] + [(f"D{i + 1}", s) for i, s in enumerate(model.decoder.stages)]
    for name, module in stages:
        module.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:])))
    with torch.no_grad():
        skips, bottleneck = model.forward_swin(torch.randn(1, 1, 512, 512))
        assert [tuple(s.shape[1:]) for s in skips] == [(128, 128, 96), (64, 64, 192), (32, 32, 384)]
        assert tuple(bottleneck.shape[1:]) == (16, 16, 768)
        assert model(torch.randn(1, 1, 512, 512)).shape == (1, 3, 512, 512)
    assert shapes == {"D0": (32, 32, 384), "D1": (64, 64, 192), "D2": (128, 128, 96), "D3": (128, 128, 96)}
    assert [s.fuse.in_features for s in model.decoder.stages] == [1792, 896, 448]
    assert model.decoder.bottleneck.expand.in_features == 2816 and model.pad_multiple == 256

    intermediate = create_model("cs_unet_intermediate")
    assert 52e6 < sum(p.numel() for p in intermediate.parameters()) < 56e6  # 54.3 M (authors: ~56 M)
