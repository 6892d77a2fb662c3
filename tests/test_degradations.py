"""LR synthesis: MATLAB bicubic (BasicSR's imresize) or antialiased bilinear, 8-bit rounded."""
import numpy as np
import pytest
from basicsr.utils.matlab_functions import imresize

from hmoe_arch.data.degradations import crop_to_scale, downsample


def test_bicubic_is_basicsr_imresize_rounded_to_8_bits() -> None:
    img = np.random.default_rng(0).random((16, 12, 3)).astype(np.float32)
    lr = downsample(img, 4)
    expected = np.clip(imresize(img, 0.25), 0, 1)
    np.testing.assert_array_equal(lr, (expected * 255).round().astype(np.float32) / 255)
    assert lr.shape == (4, 3, 3)


def test_bilinear_averages_and_differs_from_bicubic() -> None:
    img = np.zeros((8, 8, 3), np.float32)
    img[:, ::2] = 1.0
    lr = downsample(img, 2, 'bilinear')
    # the triangle filter spans 4 input columns: inside the image it averages the stripes to grey
    np.testing.assert_allclose(lr[:, 1:3], np.full((4, 2, 3), 128 / 255), atol=1 / 255)
    constant = downsample(np.full((8, 8, 3), 0.4, np.float32), 2, 'bilinear')
    np.testing.assert_allclose(constant, np.full((4, 4, 3), 102 / 255), atol=1e-6)
    noise = np.random.default_rng(1).random((8, 8, 3)).astype(np.float32)
    assert not np.array_equal(downsample(noise, 2, 'bilinear'), downsample(noise, 2, 'bicubic'))


def test_errors() -> None:
    with pytest.raises(ValueError, match='not a multiple of the scale 4'):
        downsample(np.zeros((10, 8, 3), np.float32), 4)
    with pytest.raises(ValueError, match='degradation must be one of'):
        downsample(np.zeros((8, 8, 3), np.float32), 2, 'nearest')


def test_crop_to_scale_crops_bottom_right() -> None:
    img = np.arange(251 * 256 * 3).reshape(251, 256, 3)
    cropped = crop_to_scale(img, 4)
    assert cropped.shape == (248, 256, 3)
    np.testing.assert_array_equal(cropped, img[:248])
