"""Face crop: golden parity with the reference `Crop_and_resize` and its maths."""

import numpy as np
import pytest

from synthdistill_jax import faces
from tests import golden


def test_crop_box_matches_reference_at_256():
  assert faces.compute_crop_box(256) == ((21, 234), (22, 235))


@pytest.mark.parametrize("resolution", [64, 128, 512, 1024])
def test_crop_box_is_inside_and_about_213_of_256(resolution):
  (top, bottom), (left, right) = faces.compute_crop_box(resolution)
  assert 0 <= top < bottom <= resolution and 0 <= left < right <= resolution
  # The face spans about 213/256 of the frame whatever the resolution.
  assert abs((bottom - top) / resolution - 213 / 256) < 0.03


def test_crop_golden():
  arrays = golden.load_arrays("crop")
  x = np.transpose(arrays["x"], (0, 2, 3, 1))
  y = np.asarray(faces.crop_and_resize(x))
  np.testing.assert_allclose(
      np.transpose(y, (0, 3, 1, 2)), arrays["y"], rtol=0, atol=1e-6
  )


def test_generator_to_faces_clips_and_rescales():
  arrays = golden.load_arrays("crop")
  x01 = np.transpose(arrays["x"], (0, 2, 3, 1))
  # Values beyond [-1, 1] are clipped before (x + 1) / 2.
  gen = x01 * 2.0 - 1.0
  gen = np.where(x01 > 0.9, 5.0, gen).astype(np.float32)
  y = np.asarray(faces.generator_to_faces(gen))
  ref = faces.crop_and_resize(np.where(x01 > 0.9, 1.0, x01))
  np.testing.assert_allclose(y, np.asarray(ref), atol=2e-6)


def test_interpolation_matrix_rows_sum_to_one_and_identity():
  m = faces.create_interpolation_matrix(213, 112)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
  np.testing.assert_array_equal(
      faces.create_interpolation_matrix(112, 112), np.eye(112, dtype=np.float32)
  )


def test_normalisations():
  x = np.array([0.0, 0.5, 1.0], np.float32)
  np.testing.assert_allclose(
      faces.normalise_for_teacher(x), [-127.5 / 128, 0.0, 127.5 / 128]
  )
  np.testing.assert_allclose(faces.normalise_for_student(x), [-1.0, 0.0, 1.0])
  np.testing.assert_array_equal(
      faces.quantise_faces(np.array([0.0, 0.501, 1.2])), [0, 128, 255]
  )
