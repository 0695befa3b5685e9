"""segment.progress: tile counts, tiles/s and ETA of one image; predict's one-line summary per image."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pretrain.synthetic_materials import superalloy
from segment.infer import Predictor
from segment.batch import predict_paths
from segment.records import PredictOptions
from segment.progress import TileProgress, format_seconds
from segment.sources import ArraySource
from segment.stream import predict_stream
from segment.tiling import tile_origins
from segment.zoom import zoomed_hw


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rate_and_eta_are_the_average_since_start():
    clock = FakeClock()
    p = TileProgress("img", report=False, clock=clock)
    assert p.eta is None and p.rate == 0.0
    p.start(100)
    clock.t += 10
    p.update(25)
    assert p.rate == pytest.approx(2.5) and p.eta == pytest.approx(30.0)
    assert p.line() == "img: tiles 25/100 (25 %), 2.5 tiles/s, elapsed 10 s, ETA 30 s"
    clock.t += 30
    p.update(75)
    p.close()
    clock.t += 50  # closed: the clock stopped
    assert p.seconds == pytest.approx(40.0) and p.eta == 0.0 and p.done == 100


def test_log_lines_every_interval_without_a_terminal(caplog):
    clock = FakeClock()
    p = TileProgress("big.tif", bar=False, every_s=30, clock=clock)
    with caplog.at_level(logging.INFO, logger="segment.progress"):
        p.start(961, "4096x4096 px")
        for _ in range(40):  # 40 batches of 4 tiles, 2 s each: a line at 30, 60 s
            clock.t += 2
            p.update(4)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "big.tif: 961 tiles (4096x4096 px)"
    assert lines[1:] == ["big.tif: tiles 60/961 (6 %), 2 tiles/s, elapsed 30 s, ETA 7 min 30 s",
                         "big.tif: tiles 120/961 (12 %), 2 tiles/s, elapsed 1 min 00 s, ETA 7 min 00 s"]


def test_no_report_no_output(caplog):
    clock = FakeClock()
    p = TileProgress("x", report=False, every_s=0, clock=clock)
    with caplog.at_level(logging.DEBUG):
        p.start(10)
        clock.t += 1
        p.update(5)
    assert not caplog.records and p.done == 5


def test_format_seconds():
    assert [format_seconds(s) for s in (0.4, 59, 61, 3599, 3600 * 2 + 7 * 60)] == \
        ["0 s", "59 s", "1 min 01 s", "59 min 59 s", "2 h 07 min"]


class Conv(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


@pytest.mark.parametrize("zoom", [1.0, 0.5])
def test_stream_counts_exactly_the_planned_tiles(zoom):
    image = superalloy((300, 190), seed=0)[0]
    predictor = Predictor(Conv(), tile_size=64, batch_size=3, mean=(0.5,), std=(0.25,), intensity="zscore",
                          zoom=zoom)
    progress = TileProgress("img", report=False)
    predict_stream(predictor, ArraySource(image), progress=progress)
    grid = zoomed_hw(image.shape, zoom)
    assert progress.done == progress.total == len(tile_origins(grid, (64, 64), 0.5))
    assert progress.t_end is not None and progress.seconds > 0


def test_predict_logs_one_line_per_image(tmp_path, caplog):
    for i in range(2):
        Image.fromarray(superalloy((100, 120 + 10 * i), seed=i)[0]).save(tmp_path / f"im{i}.png")
    predictor = Predictor(Conv(), tile_size=64, batch_size=4, mean=(0.5,), std=(0.25,), intensity="zscore")
    options = PredictOptions(class_names=["matrix", "secondary", "tertiary"],
                             colors=[[0, 0, 0], [0, 0, 255], [255, 0, 0]], progress=False, overlays=False)
    with caplog.at_level(logging.INFO, logger="segment.predict"):
        result = predict_paths(predictor, [tmp_path / "im0.png", tmp_path / "im1.png"], tmp_path / "o", options)
    lines = [r.getMessage() for r in caplog.records if "tiles/s" in r.getMessage()]
    assert len(lines) == 2 and lines[0].startswith("[1/2] im0: 120x100 px, ") and lines[1].startswith("[2/2] im1:")
    fr = {s.name: s.area_fraction for s in result.images[0].summaries}
    assert f"secondary {100 * fr['secondary']:.2f} %" in lines[0]
    n = len(tile_origins((100, 120), (64, 64), 0.5))
    assert f" {n} tiles in " in lines[0] and result.images[0].model_tiles == n
    assert np.isclose(sum(fr.values()), 1.0)
