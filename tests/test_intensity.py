"""One intensity mapping everywhere: training, evaluation, the in-memory and band-wise predictors and
pretraining map the same image to the same model input, for every mode (issue 13, item 1)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pretrain.intensity import INTENSITY_MODES, intensity_window, scale_intensity
from pretrain.io import write_tiff
from pretrain.samples import normalize_intensity
from segment.checkpoint import save_model
from segment.data import SegmentationDataset
from segment.infer import Predictor
from segment.sources import open_source
from segment.stream import iter_logit_rows


class Identity(nn.Module):
    """Logits = the model input, so a prediction shows exactly what the model was given."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :1]


@pytest.fixture()
def skewed_pair(tmp_path):
    """A 16-bit micrograph whose histogram is dominated by one bright phase (as Super3's training
    image) with a dark particle phase, and its mask."""
    rng = np.random.default_rng(0)
    image = rng.normal(40000, 1500, (96, 80))
    yy, xx = np.mgrid[:96, :80]
    particles = ((yy % 24 - 12) ** 2 + (xx % 20 - 10) ** 2) < 25
    image[particles] = rng.normal(15000, 1500, particles.sum())
    raw = np.clip(image, 0, 65535).astype(np.uint16)
    img = write_tiff(tmp_path / "a.tif", raw)
    mask = tmp_path / "a_mask.png"
    Image.fromarray(particles.astype(np.uint8)).save(mask)
    return raw, img, mask


@pytest.mark.parametrize("intensity", INTENSITY_MODES)
def test_training_and_every_inference_path_give_the_model_the_same_input(tmp_path, skewed_pair, intensity):
    raw, img, mask = skewed_pair
    mean, std = (0.5,), (0.25,)
    train_ds = SegmentationDataset([(img, mask)], {"names": ["a", "b"], "values": [0, 1]}, mean=mean, std=std,
                                   intensity=intensity)
    trained_on = train_ds[0]["image"][0].numpy()  # what fine-tuning feeds the model (no augmentation)

    # a checkpoint records the mapping; evaluate/predict read it back from model.json
    save_model(tmp_path / "ckpt", nn.Conv2d(1, 2, 1), {"model": "x", "model_kwargs": {}, "intensity": intensity})
    meta = json.loads((tmp_path / "ckpt" / "model.json").read_text())
    predictor = Predictor(Identity(), tile_size=32, batch_size=3, mean=mean, std=std, intensity=meta["intensity"])
    in_memory = predictor.predict_logits(predictor.normalize(predictor.scale(raw)))[0].numpy()  # evaluate, predict
    with open_source(img) as src:
        streamed = torch.cat([b for _, b in iter_logit_rows(predictor, src)], dim=1)[0].numpy()  # predict, band-wise
    pretrained_on = (normalize_intensity(raw, intensity) - mean[0]) / std[0]  # pretraining's loader

    for name, seen in (("in-memory predictor", in_memory), ("band-wise predictor", streamed),
                       ("pretraining", pretrained_on)):
        np.testing.assert_allclose(seen, trained_on, rtol=1e-5, atol=1e-5, err_msg=f"{intensity}: {name}")


def test_per_image_windows_follow_their_definitions():
    rng = np.random.default_rng(1)
    image = rng.normal(1000, 50, (64, 64)).astype(np.float32)
    lo, hi = intensity_window(image, "zscore")
    assert (lo + hi) / 2 == pytest.approx(image.mean(), rel=1e-4)
    assert (hi - lo) / 6 == pytest.approx(image.std(), rel=1e-3)
    lo, hi = intensity_window(image, "robust")
    mad = np.median(np.abs(image - np.median(image)))
    assert (lo + hi) / 2 == pytest.approx(np.median(image), rel=1e-4)
    assert (hi - lo) / 6 == pytest.approx(1.4826 * mad, rel=1e-3)
    assert intensity_window(image, "dtype") is None
    # a window is a property of the image: the same scene brighter and with more contrast maps alike
    for mode in ("percentile", "zscore", "robust"):
        np.testing.assert_allclose(scale_intensity(3 * image + 500, mode), scale_intensity(image, mode), atol=1e-4)


def test_robust_window_falls_back_to_the_std_when_most_pixels_share_one_value():
    image = np.zeros((32, 32), np.uint8)
    image[:4] = 200  # 1/8 of the pixels: the MAD is 0
    lo, hi = intensity_window(image, "robust")
    assert hi > lo and (hi - lo) / 6 == pytest.approx(image.astype(float).std(), rel=1e-6)
