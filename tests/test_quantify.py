"""segment.quantify: particle statistics on label maps with known particles, units, pooling."""
import math

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from segment.quantify import (
    Scale,
    area_fractions,
    label_particles,
    measure_particles,
    parse_pixel_size,
    pool_summaries,
    quantify_labels,
    size_stats,
)

NAMES = ["matrix", "secondary", "tertiary"]


def discs(shape, specs):
    """uint8 label map with class-``k`` discs ``(cy, cx, r, k)`` drawn in order."""
    lab = np.zeros(shape, np.uint8)
    for cy, cx, r, k in specs:
        rr, cc = disk((cy, cx), r, shape=shape)
        lab[rr, cc] = k
    return lab


# interior discs: (cy, cx, r, class); tertiary ones small
INTERIOR = [(40, 40, 15, 1), (40, 120, 10, 1), (120, 60, 20, 1), (130, 150, 12, 1),
            (80, 200, 4, 2), (180, 200, 5, 2), (190, 30, 3, 2)]
BORDER = [(0, 100, 8, 1), (100, 0, 9, 1), (239, 120, 10, 1), (100, 259, 7, 2)]  # cut by each edge


@pytest.fixture
def labels():
    return discs((240, 260), INTERIOR + BORDER)


def test_counts_ecd_and_border_exclusion(labels):
    summaries, table = quantify_labels(labels, NAMES, [1, 2])
    matrix, secondary, tertiary = summaries
    assert not matrix.particles and matrix.row()["count_interior"] == ""
    assert (secondary.count_interior, secondary.count_border) == (4, 3)
    assert (tertiary.count_interior, tertiary.count_border) == (3, 1)
    expected = sorted(2 * r for _, _, r, k in INTERIOR if k == 1)
    np.testing.assert_allclose(sorted(secondary.ecd_interior), expected, atol=1.5)
    expected = sorted(2 * r for _, _, r, k in INTERIOR if k == 2)
    np.testing.assert_allclose(sorted(tertiary.ecd_interior), expected, atol=1.5)
    # area fractions are exact pixel fractions, border particles included
    for c, s in enumerate(summaries):
        assert s.area_fraction == (labels == c).sum() / labels.size
    assert math.isclose(sum(s.area_fraction for s in summaries), 1.0)
    np.testing.assert_array_equal(area_fractions(labels, 3), [s.area_fraction for s in summaries])
    # one table row per particle, border flag matches
    assert len(table["particle"]) == 11 and table["touches_border"].sum() == 4
    assert set(table["class"]) == {"secondary", "tertiary"}
    row = secondary.row()
    assert row["count_total"] == 7 and row["unit"] == "px" and row["density_unit"] == "1/Mpx"
    assert row["ecd_d50"] == pytest.approx(np.percentile(secondary.ecd_interior, 50))


def test_gundersen_number_density(labels):
    (_, secondary, tertiary), _ = quantify_labels(labels, NAMES, [1, 2])
    # secondary: 4 interior + top- and left-cut discs counted, the bottom-cut one not
    assert secondary.count_gundersen == 6
    assert secondary.number_density == pytest.approx(6 / labels.size * 1e6)
    assert tertiary.count_gundersen == 3  # the right-cut tertiary is excluded


def test_physical_units():
    lab = discs((200, 200), [(100, 100, 20, 1)])
    scale = Scale(2.0)  # 2 nm per pixel
    (_, s, _), table = quantify_labels(lab, NAMES, [1, 2], scale=scale)
    assert s.unit == "nm" and s.ecd_interior[0] == pytest.approx(80, abs=3)
    assert table["area"][0] == pytest.approx((lab == 1).sum() * 4)
    assert table["perimeter"][0] == pytest.approx(2 * math.pi * 40, rel=0.03)
    area_um2 = 200 * 200 * (2e-3) ** 2
    assert s.number_density == pytest.approx(1 / area_um2)
    assert s.row()["density_unit"] == "1/um^2" and s.row()["area_unit"] == "nm^2"


def test_aspect_ratio_and_centroid():
    lab = np.zeros((100, 120), np.uint8)
    rr, cc = ellipse(50, 60, 10, 30, shape=lab.shape)
    lab[rr, cc] = 1
    t = measure_particles(lab.astype(np.int32))
    assert t["aspect_ratio"][0] == pytest.approx(3.0, rel=0.05)
    assert (t["centroid_y_px"][0], t["centroid_x_px"][0]) == pytest.approx((50, 60), abs=0.5)
    line = np.zeros((10, 10), np.int32)
    line[5, 2:8] = 1
    assert np.isnan(measure_particles(line)["aspect_ratio"][0])  # one pixel thin


def test_watershed_splits_two_touching_discs():
    lab = discs((120, 160), [(60, 60, 20, 1), (60, 96, 20, 1)])  # centres 36 px apart: they overlap
    mask = lab == 1
    _, n_plain = label_particles(mask)
    split, n_split = label_particles(mask, watershed=True)
    assert n_plain == 1 and n_split == 2
    assert split.dtype == np.int32 and ((split > 0) == mask).all()
    sizes = np.bincount(split.ravel())[1:]
    assert abs(int(sizes[0]) - int(sizes[1])) < 0.05 * sizes.sum()
    # a single disc, a shallow-necked pair, an elongated ellipse and a thin line stay whole
    one = discs((80, 80), [(40, 40, 18, 1)]) == 1
    assert label_particles(one, watershed=True)[1] == 1
    peanut = discs((80, 100), [(40, 45, 15, 1), (40, 53, 15, 1)]) == 1  # neck only ~0.5 px narrower
    assert label_particles(peanut, watershed=True)[1] == 1
    long = np.zeros((60, 120), bool)
    rr, cc = ellipse(30, 60, 8, 40, shape=long.shape)
    long[rr, cc] = True
    assert label_particles(long, watershed=True)[1] == 1
    thin = np.zeros((20, 40), bool)
    thin[10, 5:35] = True
    assert label_particles(thin, watershed=True)[1] == 1
    (_, s, _), _ = quantify_labels(lab, NAMES, [1], watershed=True)
    assert s.count_interior == 2


def test_eight_connectivity():
    mask = np.zeros((10, 10), bool)
    mask[2, 2] = mask[3, 3] = True  # diagonal neighbours: one particle
    assert label_particles(mask)[1] == 1


@pytest.mark.parametrize(
    ("text", "nm"),
    [("2.5nm", 2.5), ("2.5 nm", 2.5), ("0.0025um", 2.5), ("2.5µm", 2500.0), ("4μm", 4000.0),
     ("1e-3 um", 1.0), ("3 microns", 3000.0), ("px", None), ("1px", None), ("PX", None)],
)
def test_parse_pixel_size(text, nm):
    got = parse_pixel_size(text)
    assert got == (pytest.approx(nm) if nm is not None else None)


@pytest.mark.parametrize("text", ["2.5", "abc", "-1nm", "0nm", "2.5 furlongs", ""])
def test_parse_pixel_size_rejects(text):
    with pytest.raises(ValueError):
        parse_pixel_size(text)


def test_size_stats_and_pooling(labels):
    assert all(math.isnan(v) for v in size_stats(np.array([])).values())
    a, _ = quantify_labels(labels, NAMES, [1, 2], image="a")
    b, _ = quantify_labels(labels[:, :130], NAMES, [1, 2], image="b")
    c, _ = quantify_labels(labels, NAMES, [1, 2], scale=Scale(5.0), image="c")
    pooled = pool_summaries(a + b)
    assert [p.image for p in pooled] == ["ALL"] * 3
    sec = pooled[1]
    assert sec.count_interior == a[1].count_interior + b[1].count_interior
    assert sec.area_fraction == pytest.approx((a[1].pixels + b[1].pixels) / (labels.size + labels[:, :130].size))
    assert sec.number_density == pytest.approx(
        (a[1].count_gundersen + b[1].count_gundersen) / (labels.size + labels[:, :130].size) * 1e6)
    mixed = pool_summaries(a + c)
    assert {p.image for p in mixed} == {"ALL [nm]", "ALL [px]"}
    nm = [p for p in mixed if p.image == "ALL [nm]" and p.name == "secondary"][0]
    assert nm.number_density == pytest.approx(c[1].number_density)


def test_bad_inputs():
    with pytest.raises(ValueError, match="class"):
        quantify_labels(np.full((4, 4), 5, np.uint8), NAMES, [1])
    with pytest.raises(ValueError, match="particle classes"):
        quantify_labels(np.zeros((4, 4), np.uint8), NAMES, [7])
    with pytest.raises(ValueError):
        Scale(-1.0)
