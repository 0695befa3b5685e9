"""pretrain.data (streaming loader) and pretrain.views (micrograph augmentations), on tiny shards."""
from __future__ import annotations

import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain import shards as sh
from pretrain.data import Batch, SkipCounter, iterate_samples, list_shards, make_loader
from pretrain.intensity import intensity_range
from pretrain.io import write_tiff
from pretrain.samples import normalize_intensity
from pretrain.shard_format import MANIFEST_NAME
from pretrain.views import EvalView, MultiCrop, TwoViews, as_image_tensor, stack_views

SIZE = 16


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 images (4 x 8-bit PNG in class a, 4 x 16-bit TIFF in class b), 2 per shard -> 4 shards."""
    tmp = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(1)
    for i in range(4):
        (tmp / "raw" / "a").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (24, 20), dtype=np.uint8)).save(tmp / "raw" / "a" / f"{i}.png")
        write_tiff(tmp / "raw" / "b" / f"{i}.tif", rng.integers(1000, 3000, (20, 24), dtype=np.uint16))
    out = tmp / "shards"
    sh.write_shards([tmp / "raw"], out, maxcount=2, workers=0, labels="folder:1", progress=False)
    return out


def _shard_of(key: str) -> int:
    return int(key.split("_")[0]) // 2  # keys start with the file index; 2 files per shard


def _epoch(loader) -> list[Batch]:
    return list(loader)


def test_batches_shapes_labels_and_epoch_length(shard_dir):
    loader = make_loader(shard_dir, batch_size=4, steps_per_epoch=3, views=TwoViews(SIZE), num_workers=0,
                         shuffle_buffer=8, with_labels=True)
    assert len(loader) == 3
    for _ in range(2):  # two epochs, each exactly steps_per_epoch batches
        batches = _epoch(loader)
        assert len(batches) == 3
        for b in batches:
            assert [tuple(v.shape) for v in b.views] == [(4, 1, SIZE, SIZE)] * 2
            assert all(v.dtype == torch.float32 and 0 <= v.min() and v.max() <= 1 for v in b.views)
            assert b.labels.dtype == torch.int64 and set(b.labels.tolist()) <= {0, 1}
            assert b.skipped == 0 and len(b.keys) == 4


def test_same_seed_same_stream(shard_dir):
    def keys(seed: int) -> list[str]:
        loader = make_loader(shard_dir, batch_size=2, steps_per_epoch=4, views=TwoViews(SIZE), num_workers=0,
                             shuffle_buffer=4, seed=seed)
        return [k for b in loader for k in b.keys]
    assert keys(0) == keys(0)
    assert keys(0) != keys(1)


def test_truncated_shard_is_skipped_and_counted(shard_dir, tmp_path, caplog):
    broken = tmp_path / "broken"
    broken.mkdir()
    for url in list_shards(shard_dir):
        (broken / Path(url).name).write_bytes(Path(url).read_bytes())
    (broken / MANIFEST_NAME).write_bytes((shard_dir / MANIFEST_NAME).read_bytes())
    victim = broken / "shard-000001.tar"
    with tarfile.open(victim) as tar:
        last = tar.getmembers()[-1]
    # cut halfway through the last image (cutting only the zero padding would lose nothing)
    assert last.name.endswith(".png")
    victim.write_bytes(victim.read_bytes()[: last.offset_data + last.size // 2])

    caplog.set_level(logging.WARNING, logger="pretrain.data")
    loader = make_loader(broken, batch_size=4, steps_per_epoch=8, views=TwoViews(SIZE), num_workers=2,
                         shuffle_buffer=4, seed=3)
    batches = _epoch(loader)
    assert len(batches) == 8 and all(b.views[0].shape[0] == 4 for b in batches)
    assert sum(b.skipped for b in batches) > 0  # counted across worker processes
    keys = {k for b in batches for k in b.keys}
    assert not any(k.startswith("00000003_") for k in keys)  # the cut sample never comes out
    assert len(_epoch(loader)) == 8  # next epoch still full


@pytest.mark.parametrize("explicit", [True, False])
def test_ranks_resample_all_shards_then_split_into_equal_streams(shard_dir, monkeypatch, explicit):
    """Issue 16 item 6: every rank draws from every shard (resample, then split), and 2 ranks x N steps
    yield equal counts of full batches."""
    seen = {}
    for rank in (0, 1):
        if explicit:
            kwargs = {"rank": rank, "world_size": 2}
        else:
            monkeypatch.setenv("RANK", str(rank))
            monkeypatch.setenv("WORLD_SIZE", "2")
            kwargs = {}
        loader = make_loader(shard_dir, batch_size=3, steps_per_epoch=12, views=TwoViews(SIZE), num_workers=0,
                             shuffle_buffer=4, **kwargs)
        batches = _epoch(loader)
        assert len(batches) == 12 and all(len(b.keys) == 3 for b in batches)
        seen[rank] = {_shard_of(k) for b in batches for k in b.keys}
    # 18 shard draws per rank over 4 shards: a missing shard has probability < 4 x (3/4)^18 = 0.7 %,
    # and the stream is seeded, so this is deterministic; splitting urls[rank::world] first gave {0, 2} / {1, 3}
    assert seen[0] == seen[1] == {0, 1, 2, 3}


def test_rank_and_worker_streams_take_disjoint_positions_of_one_shard_sequence():
    """The shard draws of (rank, worker) pairs interleave into the single-process sequence: disjoint
    positions, equal counts, every shard drawn in proportion (uneven shard counts per rank are gone)."""
    from itertools import islice

    from pretrain.data import shard_stream

    urls = [f"s{i}.tar" for i in range(5)]  # 5 shards for 2 ranks x 2 workers
    single = list(islice(shard_stream(urls, seed=7, rank=0, world=1, epoch=3), 4000))
    parts = {(r, w): list(islice(shard_stream(urls, seed=7, rank=r, world=2, epoch=3, worker=w, num_workers=2), 1000))
             for r in (0, 1) for w in (0, 1)}
    for (r, w), draws in parts.items():
        assert draws == single[r + 2 * w::4]
        counts = np.array([draws.count(u) for u in urls])
        assert counts.min() > 150, counts  # about 200 each
    assert list(islice(shard_stream(urls, seed=7, rank=0, world=1, epoch=4), 50)) != single[:50]  # new epoch


def test_iterate_samples_is_one_ordered_pass(shard_dir):
    samples = list(iterate_samples(shard_dir, transform=EvalView(SIZE)))
    assert [int(k.split("_")[0]) for _, _, k in samples] == list(range(8))
    assert all(img.shape == (1, SIZE, SIZE) for img, _, _ in samples)
    assert sorted({label for _, label, _ in samples}) == [0, 1]
    raw = next(iter(iterate_samples(shard_dir)))[0]
    assert raw.shape[0] == 1 and raw.dtype == torch.float32 and raw.min() == 0 and raw.max() == 1


def test_normalize_intensity_8_and_16_bit():
    ramp16 = np.linspace(1000, 3000, 1000).astype(np.uint16).reshape(20, 50)
    ramp16[0, 0] = 65535  # hot pixel: clipped, does not set the scale
    out = normalize_intensity(ramp16)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.4 < float(np.median(out)) < 0.6
    lo, hi = intensity_range(ramp16)
    assert 1000 <= lo < 1020 and 2980 < hi <= 3000
    ramp8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert normalize_intensity(ramp8).max() == 1 and normalize_intensity(ramp8).min() == 0
    constant = np.full((4, 4), 128, np.uint8)
    assert (normalize_intensity(constant) == 0).all()  # constant -> zeros (pretrain.intensity.scale_intensity)
    floats = np.random.default_rng(0).normal(size=(8, 8)).astype(np.float32)
    assert 0 <= normalize_intensity(floats).min() and normalize_intensity(floats).max() <= 1


def test_skip_counter_counts_and_gives_up():
    counter = SkipCounter(max_consecutive=2)
    assert counter(ValueError("a")) and counter(ValueError("b"))
    assert counter.take() == 2 and counter.take() == 0
    counter(ValueError("c"))
    counter(ValueError("d"))
    with pytest.raises(RuntimeError, match="consecutive"):
        counter(ValueError("e"))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_views_shapes_and_ranges(dtype):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    top = np.iinfo(dtype).max
    image = rng.integers(top // 4, top // 2, (40, 30)).astype(dtype)
    for channels in (1, 3):
        out = TwoViews(SIZE, channels=channels)(image)
        assert len(out) == 2
        for v in out:
            assert v.shape == (channels, SIZE, SIZE) and v.dtype == torch.float32
            assert 0 <= v.min() and v.max() <= 1
    # robust normalisation spreads a band of a quarter of the dtype range over [0, 1]
    full = as_image_tensor(image)
    assert full.shape == (1, 40, 30) and full.min() == 0 and full.max() == 1
    eval_view = EvalView(SIZE)(image)
    assert eval_view.shape == (1, SIZE, SIZE) and 0 <= eval_view.min() and eval_view.max() <= 1
    assert torch.equal(eval_view, EvalView(SIZE)(image))  # deterministic
    torch.manual_seed(0)
    plain = TwoViews(SIZE)(image)
    torch.manual_seed(0)
    normalised = TwoViews(SIZE, mean=0.5, std=0.25)(image)
    for p, n in zip(plain, normalised, strict=True):
        assert torch.allclose(n, (p - 0.5) / 0.25, atol=1e-6)  # (x - mean) / std applied last


def test_multicrop_counts_and_collation():
    crop = MultiCrop(global_size=24, local_size=12, n_local=3)
    image = torch.rand(1, 40, 40)
    views = crop(image)
    assert crop.n_views == 5 and len(views) == 5
    assert [tuple(v.shape) for v in views] == [(1, 24, 24)] * 2 + [(1, 12, 12)] * 3
    batch = stack_views([crop(image), crop(image)])
    assert [tuple(v.shape) for v in batch] == [(2, 1, 24, 24)] * 2 + [(2, 1, 12, 12)] * 3
    assert len(MultiCrop(24, 12, n_local=0)(image)) == 2


def test_views_accept_pil_and_float_tensors():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 20, 3), dtype=np.uint8))
    assert as_image_tensor(rgb).shape == (1, 20, 20)
    x = torch.rand(20, 20)
    assert torch.equal(as_image_tensor(x), x[None])
    out = MultiCrop(16, 8, n_local=1)(x)
    assert len(out) == 3 and all(0 <= v.min() and v.max() <= 1 for v in out)


def test_no_manifest_falls_back_to_tar_files(shard_dir, tmp_path):
    for url in list_shards(shard_dir):
        os.link(url, tmp_path / Path(url).name)
    assert [Path(u).name for u in list_shards(tmp_path)] == [Path(u).name for u in list_shards(shard_dir)]
    with pytest.raises(FileNotFoundError):
        list_shards(tmp_path / "nothing")
