"""segment.metrics against hand-computed cases."""
import math

import numpy as np
import pytest

from segment.metrics import (
    aggregate,
    confusion_matrix,
    dice_per_class,
    iou_per_class,
    mean_iou,
    nasa_iou,
    pixel_accuracy,
    summarize,
)

# 2x4 image, 3 classes; class 2 never appears in truth nor prediction.
TRUTH = np.array([[0, 0, 0, 1], [0, 1, 1, 1]], dtype=np.uint8)
PRED = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], dtype=np.uint8)


def test_confusion_matrix_rows_truth_cols_pred():
    cm = confusion_matrix(PRED, TRUTH, 3)
    assert cm.dtype == np.int64
    # truth 0: predicted 0 three times, 1 once; truth 1: predicted 0 once, 1 three times
    np.testing.assert_array_equal(cm, [[3, 1, 0], [1, 3, 0], [0, 0, 0]])


def test_confusion_matrix_ignores_out_of_range_and_ignore_index():
    truth = np.array([0, 1, 255, 7, -1, 1])
    pred = np.array([0, 1, 1, 0, 1, 0])
    np.testing.assert_array_equal(confusion_matrix(pred, truth, 2), [[1, 0], [1, 1]])
    np.testing.assert_array_equal(confusion_matrix(pred, truth, 2, ignore_index=1), [[1, 0], [0, 0]])
    with pytest.raises(ValueError, match="predicted class"):
        confusion_matrix(np.array([0, 5]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)


def test_hand_computed_metrics_with_absent_class():
    cm = confusion_matrix(PRED, TRUTH, 3)
    # IoU: class 0 = 3 / (3 + 1 + 1), class 1 the same; class 2 undefined
    iou = iou_per_class(cm)
    np.testing.assert_allclose(iou[:2], [0.6, 0.6])
    assert math.isnan(iou[2])
    dice = dice_per_class(cm)
    np.testing.assert_allclose(dice[:2], [0.75, 0.75])
    assert math.isnan(dice[2])
    assert mean_iou(cm) == pytest.approx(0.6)  # NaN class excluded, not counted as 0
    assert pixel_accuracy(cm) == pytest.approx(6 / 8)
    # pooled one-hot IoU: TP = 6, sum g = sum p = 8 -> 6 / 10
    assert nasa_iou(cm) == pytest.approx(0.6)

    s = summarize(cm, ["matrix", "gamma", "crack"])
    assert s["nasa_iou"] == pytest.approx(0.6) and s["miou"] == pytest.approx(0.6)
    assert s["mdice"] == pytest.approx(0.75) and s["n_pixels"] == 8
    assert s["iou"]["gamma"] == pytest.approx(0.6) and math.isnan(s["iou"]["crack"])
    assert s["support"] == {"matrix": 4, "gamma": 4, "crack": 0}


def test_class_present_in_prediction_only_counts_zero():
    truth = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    iou = iou_per_class(confusion_matrix(pred, truth, 3))
    np.testing.assert_allclose(iou, [0.5, 1.0, 0.0])


def test_perfect_prediction():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, size=(17, 23))
    s = summarize(confusion_matrix(labels, labels, 4))
    assert s["nasa_iou"] == 1.0 and s["miou"] == 1.0 and s["mdice"] == 1.0
    assert s["pixel_accuracy"] == 1.0


def test_nasa_iou_equals_a_over_2_minus_a_and_onehot_definition():
    rng = np.random.default_rng(1)
    k = 5
    truth = rng.integers(0, k, size=(40, 31))
    pred = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, k, size=truth.shape))
    cm = confusion_matrix(pred, truth, k)
    a = pixel_accuracy(cm)
    assert nasa_iou(cm) == pytest.approx(a / (2 - a))
    g = np.eye(k)[truth]
    p = np.eye(k)[pred]
    inter = (g * p).sum()
    assert nasa_iou(cm) == pytest.approx(inter / (g.sum() + p.sum() - inter))


def test_empty_matrix_is_nan():
    cm = np.zeros((2, 2), dtype=np.int64)
    assert math.isnan(nasa_iou(cm)) and math.isnan(mean_iou(cm)) and math.isnan(pixel_accuracy(cm))


def test_aggregate_mean_of_per_image_vs_pooled():
    perfect = confusion_matrix(TRUTH, TRUTH, 3)
    imperfect = confusion_matrix(PRED, TRUTH, 3)
    agg = aggregate([perfect, imperfect], ["a", "b", "c"])
    assert agg["n_images"] == 2
    assert agg["per_image_nasa_iou"] == pytest.approx([1.0, 0.6])
    assert agg["nasa_iou_mean"] == pytest.approx(0.8)
    assert agg["nasa_iou_std"] == pytest.approx(0.2)
    assert agg["miou_image_mean"] == pytest.approx(0.8)
    # pooled: TP = 14 of 16 pixels -> A = 7/8, IoU = A / (2 - A) = 7/9
    assert agg["pooled"]["pixel_accuracy"] == pytest.approx(7 / 8)
    assert agg["pooled"]["nasa_iou"] == pytest.approx(7 / 9)
    assert agg["pooled"]["iou"]["a"] == pytest.approx(7 / 9)
    assert agg["nasa_iou"] == agg["nasa_iou_mean"] and agg["miou"] == agg["pooled"]["miou"]
    assert agg["iou_per_class"][:2] == pytest.approx([7 / 9, 7 / 9]) and math.isnan(agg["iou_per_class"][2])
    with pytest.raises(ValueError):
        aggregate([])
