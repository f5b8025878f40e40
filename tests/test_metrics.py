import math

import numpy as np
import pytest

from index import metrics
from index.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy

GT = np.array([0, 0, 1, 1, 2, -1, 255])
PRED = np.array([0, 1, 1, 1, 0, 2, 3])


def test_confusion_matrix_exact():
    conf = confusion_matrix(PRED, GT, 4)
    expected = np.zeros((4, 4), np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 2
    expected[2, 0] = 1
    assert conf.dtype == np.int64
    assert np.array_equal(conf, expected)


def test_miou_hand_computation():
    conf = confusion_matrix(PRED, GT, 4)
    # IoU_0 = 1 / (2 + 2 - 1), IoU_1 = 2 / (2 + 3 - 2), IoU_2 = 0 / (1 + 0 - 0), class 3 absent from both
    iou = iou_per_class(conf)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert mean_iou(conf) == pytest.approx((1 / 3 + 2 / 3 + 0.0) / 3)
    assert pixel_accuracy(conf) == pytest.approx(3 / 5)


def test_class_only_predicted_counts_in_the_mean():
    # class 2 never in gt but predicted: union > 0, IoU 0, it lowers the mean
    conf = confusion_matrix(np.array([0, 2]), np.array([0, 0]), 3)
    assert iou_per_class(conf)[2] == 0.0
    assert mean_iou(conf) == pytest.approx((0.5 + 0.0) / 2)


def test_confusion_accumulates():
    rng = np.random.default_rng(0)
    gt = rng.integers(-1, 5, size=200)
    pred = rng.integers(0, 5, size=200)
    total = confusion_matrix(pred[:120], gt[:120], 5) + confusion_matrix(pred[120:], gt[120:], 5)
    assert np.array_equal(total, confusion_matrix(pred, gt, 5))
    assert total.sum() == (gt >= 0).sum()


def test_architecture_names_are_aliases():
    assert metrics.iou_from_confusion is iou_per_class
    assert metrics.miou is mean_iou


def test_metric_errors():
    with pytest.raises(ValueError, match="same shape"):
        confusion_matrix(np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match=r"predictions \[-1\] outside 0..1 at scored positions"):
        confusion_matrix(np.array([-1, 0]), np.array([1, 0]), 2)
    with pytest.raises(ValueError, match=r"ground truth has ids \[5\]"):
        confusion_matrix(np.array([0]), np.array([5]), 2)
    with pytest.raises(ValueError, match="nothing was scored"):
        mean_iou(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="nothing was scored"):
        pixel_accuracy(np.zeros((3, 3), np.int64))
    with pytest.raises(ValueError, match="must be square"):
        iou_per_class(np.zeros((2, 3)))
