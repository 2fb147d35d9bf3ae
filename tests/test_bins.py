"""The `.bin` reader: round trips, the Python 2 layout, hostile files, TFDS."""

import io
import os
import pickle
import struct
import sys

import numpy as np
from PIL import Image
import pytest

from synthdistill_jax.data import verification_bin


def _faces(n, seed=0):
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, (n, 112, 112, 3), dtype=np.uint8)


def test_png_round_trip_and_batches(tmp_path):
  faces = _faces(10)
  issame = [True, False, True, True, False]
  path = verification_bin.write_bin(tmp_path / "tiny.bin", faces, issame)
  vbin = verification_bin.read_bin(path)
  assert vbin.name == "tiny" and vbin.num_pairs == 5 and vbin.num_images == 10
  np.testing.assert_array_equal(vbin.issame, issame)
  batches = list(verification_bin.iterate_batches(vbin, 4))
  assert [b.shape for b in batches] == [(4, 112, 112, 3)] * 2 + [
      (2, 112, 112, 3)
  ]
  assert all(b.dtype == np.uint8 for b in batches)
  np.testing.assert_array_equal(np.concatenate(batches), faces)


def _py2_pickle(images, issame):
  """A protocol-2 pickle with Python 2 `str` opcodes, like the real bins."""
  out = [b"\x80\x02", b"(", b"]", b"("]  # proto, mark, list, mark
  for data in images:
    out.append(b"T" + struct.pack("<I", len(data)) + data)  # BINSTRING
  out += [b"e", b"]", b"("]  # appends, list, mark
  out += [b"\x88" if s else b"\x89" for s in issame]  # NEWTRUE / NEWFALSE
  out += [b"e", b"t", b"."]  # appends, tuple, stop
  return b"".join(out)


def _smooth_faces(n):
  # JPEG keeps smooth images close; random noise would not be.
  yy, xx = np.mgrid[0:112, 0:112]
  return np.stack(
      [
          np.stack([xx * 2 + k, yy * 2, (xx + yy + 40 * k) % 256], -1)
          for k in range(n)
      ]
  ).astype(np.uint8)


def test_reads_python2_layout(tmp_path):
  faces = _smooth_faces(4)
  encoded = [verification_bin.encode_image(f, "JPEG") for f in faces]
  path = tmp_path / "py2.bin"
  path.write_bytes(_py2_pickle(encoded, [True, False]))
  vbin = verification_bin.read_bin(path)
  np.testing.assert_array_equal(vbin.issame, [True, False])
  (batch,) = verification_bin.iterate_batches(vbin, 8)
  # JPEG is lossy: close to the source, identical to PIL's own decode.
  assert np.abs(batch.astype(int) - faces).mean() < 3
  pil = np.asarray(Image.open(io.BytesIO(encoded[2])).convert("RGB"))
  np.testing.assert_array_equal(batch[2], pil)


@pytest.mark.parametrize("protocol", [0, 2, 4, "numpy1"])
def test_numpy_bool_labels_are_accepted(tmp_path, protocol):
  faces = _faces(4, 3)
  encoded = [verification_bin.encode_image(f) for f in faces]
  labels = [np.bool_(True), np.bool_(False)]
  if protocol == "numpy1":  # numpy < 2 names its module numpy.core.
    data = pickle.dumps((encoded, labels), protocol=2)
    assert b"numpy._core.multiarray\nscalar" in data
    data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
  else:
    data = pickle.dumps((encoded, labels), protocol=protocol)
  path = tmp_path / "np.bin"
  path.write_bytes(data)
  vbin = verification_bin.read_bin(path)
  assert vbin.issame.dtype == bool
  np.testing.assert_array_equal(vbin.issame, [True, False])
  assert np.dtype(bool) == np.dtype("b1")  # numpy's own dtype untouched.


class _Evil:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.mkdir, (self.marker,))


def _hostile_cases(tmp_path):
  good = [verification_bin.encode_image(f) for f in _faces(4, 2)]
  png = good[0]
  small = verification_bin.encode_image(np.zeros((64, 64, 3), np.uint8))
  marker = str(tmp_path / "pwned")
  return {
      "code": (pickle.dumps((good, [_Evil(marker), True])), "refused global"),
      "numpy_bools": (
          pickle.dumps((good, np.array([True, False]))),
          "refused global",
      ),
      "int_labels": (pickle.dumps((good, [1, 0])), r"issame\[0\] is int"),
      # numpy booleans pass the allow-list; no other numpy scalar does.
      "numpy_float_labels": (
          pickle.dumps((good, [np.float64(1.0), True]), protocol=2),
          r"refused numpy.dtype\('f8'\)",
      ),
      "numpy_int_labels": (
          pickle.dumps((good, [np.bool_(True), np.int8(0)]), protocol=4),
          r"refused numpy.dtype\('i1'\)",
      ),
      "numpy_bool_bad_data": (
          pickle.dumps((good, [np.bool_(True), True]), protocol=4).replace(
              b"C\x01\x01", b"C\x01\x07"
          ),
          "refused numpy bool scalar data",
      ),
      "numpy_bool_bad_state": (
          pickle.dumps((good, [np.bool_(True), True]), protocol=4).replace(
              b"\x8c\x01|", b"\x8c\x01<"
          ),
          "refused numpy bool dtype state",
      ),
      "str_images": (
          pickle.dumps((["a", "b", "c", "d"], [True, False])),
          r"images\[0\] is str",
      ),
      "dict": (pickle.dumps({"a": 1}), "expected a pickled"),
      "odd_count": (pickle.dumps((good[:3], [True, False])), "3 images for 2"),
      "truncated": (
          pickle.dumps((good[:3] + [png[: len(png) // 2]], [True, False])),
          "image 3 cannot be decoded",
      ),
      "garbage_image": (
          pickle.dumps(
              (good[:1] + [b"\x00notanimage"] + good[2:], [1 > 0] * 2)
          ),
          "image 1 is not a JPEG/PNG",
      ),
      "wrong_size": (
          pickle.dumps((good[:2] + [small] + good[3:], [True, False])),
          "image 2 is 64x64",
      ),
      "empty": (pickle.dumps(([], [])), "no pairs"),
      "not_pickle": (b"hello, not a pickle", "not a readable pickle"),
      "truncated_pickle": (pickle.dumps((good, [True, False]))[:300], "pickle"),
  }


@pytest.mark.parametrize(
    "case",
    [
        "code",
        "numpy_bools",
        "int_labels",
        "numpy_float_labels",
        "numpy_int_labels",
        "numpy_bool_bad_data",
        "numpy_bool_bad_state",
        "str_images",
        "dict",
        "odd_count",
        "truncated",
        "garbage_image",
        "wrong_size",
        "empty",
        "not_pickle",
        "truncated_pickle",
    ],
)
def test_hostile_or_malformed_bins_fail_clearly(tmp_path, case):
  payload, message = _hostile_cases(tmp_path)[case]
  path = tmp_path / f"{case}.bin"
  path.write_bytes(payload)
  with pytest.raises(verification_bin.BinFormatError, match=message) as err:
    verification_bin.read_bin(path)
  text = str(err.value)
  assert str(path) in text and "\n" not in text
  assert not (tmp_path / "pwned").exists()  # Nothing from the file ran.


def test_missing_file(tmp_path):
  with pytest.raises(verification_bin.BinFormatError, match="cannot read"):
    verification_bin.read_bin(tmp_path / "absent.bin")


def test_tfds_builder_without_tensorflow(tmp_path):
  tfds_bins = pytest.importorskip("synthdistill_jax.data.tfds_bins")
  faces = _faces(12, 3)
  faces[5] = faces[5, :, :, :1]  # A greyscale face, stored as RGB below.
  gray = verification_bin.encode_image(faces[5, :, :, 0], "PNG")
  encoded = [verification_bin.encode_image(f) for f in faces]
  encoded[5] = gray
  issame = [True, True, False, True, False, False]
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "mini.bin").write_bytes(pickle.dumps((encoded, issame)))
  builder = tfds_bins.prepare(
      "mini", manual_dir=manual, data_dir=tmp_path / "tfds"
  )
  source = builder.as_data_source("test")
  assert len(source) == 6
  images, labels = tfds_bins.read_ordered(source)
  np.testing.assert_array_equal(labels, issame)
  vbin = verification_bin.read_bin(manual / "mini.bin")
  np.testing.assert_array_equal(
      images, np.concatenate(list(verification_bin.iterate_batches(vbin, 5)))
  )
  assert "tensorflow" not in sys.modules
