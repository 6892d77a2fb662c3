"""LR synthesis: MATLAB bicubic (BasicSR's imresize) or antialiased bilinear, 8-bit rounded."""
import numpy as np
import pytest
from basicsr.utils.matlab_functions import imresize

from hmoe_arch.data.degradations import bicubic_matrix, crop_to_scale, downsample, imresize_bicubic
from hmoe_arch.data.images import decode_rgb

from util import ucmerced_mini


def test_bicubic_is_basicsr_imresize_rounded_to_8_bits() -> None:
    img = np.random.default_rng(0).random((16, 12, 3)).astype(np.float32)
    expected = (np.clip(imresize(img, 0.25), 0, 1) * 255).round().astype(np.float32) / 255
    np.testing.assert_array_equal(downsample(img, 4, reference=True), expected)  # basicsr prepare's
    lr = downsample(img, 4)  # training patches'
    np.testing.assert_allclose(lr, expected, rtol=0, atol=1.01 / 255)
    assert lr.shape == (4, 3, 3) and (lr == expected).mean() > 0.9


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


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_bicubic_matches_basicsr_on_real_images(scale: int) -> None:
    """Whole images and odd-sized crops of real UCMerced scenes: BasicSR's loop and our two matrix products give
    the same values to float rounding."""
    images = sorted((ucmerced_mini() / 'Images').rglob('*.tif'))[::70]
    for path in images:
        img = decode_rgb(path.read_bytes(), str(path)).astype(np.float32) / 255.0
        for crop in (img, img[5:5 + 17 * scale, 9:9 + 11 * scale]):
            expected = imresize(crop, 1 / scale)
            np.testing.assert_allclose(imresize_bicubic(crop, 1 / scale), expected, rtol=0, atol=2e-6)


def test_bicubic_matrix_rows_sum_to_one_and_fold_the_mirrored_border() -> None:
    matrix = bicubic_matrix(12, 0.25)
    assert matrix.shape == (3, 12)
    np.testing.assert_allclose(matrix.sum(1), np.ones(3), atol=1e-6)
    # output 0 is centred at input 1.5 and the antialiased x4 kernel reaches 8 pixels either side: inputs 0..9,
    # and the positions left of the image, mirrored onto inputs 0..5, add to their weights
    assert (matrix[0, :10] != 0).all() and (matrix[0, 10:] == 0).all()
    assert (matrix[2, :2] == 0).all() and (matrix[2, 2:] != 0).all()
    step = np.zeros((12, 1, 1), np.float32)
    step[6:] = 1.0
    np.testing.assert_allclose(imresize_bicubic(np.repeat(step, 12, 1), 0.25)[:, 0, 0], imresize(
        np.repeat(step, 12, 1), 0.25)[:, 0, 0], atol=1e-6)
