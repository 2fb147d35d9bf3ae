"""insightface verification `.bin` files: a safe reader and a writer.

A `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin, ...) is a pickle of
`(list of 2N encoded images, list of N booleans)`: pair i is images 2i and
2i+1, aligned 112x112 faces stored as JPEG or PNG bytes. The originals were
written by Python 2, so their strings are read back as `bytes`.

Nothing in the file is ever run: the pickle goes through
`synthdistill_jax.safe_pickle` with an allow-list of numpy's boolean scalar
only (labels may be `numpy.bool_`; otherwise only containers, bytes and
booleans can be built), the structure is checked, and every image is
checked (format, decodable, RGB-convertible, 112x112) before anything else
uses the file. Images are then decoded again, batch by batch, so a benchmark
never has to sit in memory as pixels.
"""

import dataclasses
import io
import os
import pathlib
import pickle
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from synthdistill_jax import progress
from synthdistill_jax import safe_pickle

IMAGE_SIZE = 112
_FORMATS = ("JPEG", "PNG")


class BinFormatError(ValueError):
  """A `.bin` file is malformed; the message names the file and the item."""


@dataclasses.dataclass(frozen=True)
class VerificationBin:
  """A validated verification set.

  Attributes:
    path: the file it was read from.
    name: the benchmark name (file stem: 'lfw', 'cfp_fp', ...).
    images: 2N encoded images; pair i = images 2i and 2i+1.
    issame: [N] bool, True for same-identity pairs.
  """

  path: str
  name: str
  images: tuple[bytes, ...]
  issame: np.ndarray

  @property
  def num_pairs(self) -> int:
    return len(self.issame)

  @property
  def num_images(self) -> int:
    return len(self.images)


def _open_image(data: bytes, path: str, index: int) -> Image.Image:
  try:
    img = Image.open(io.BytesIO(data), formats=_FORMATS)
  except Exception as e:  # PIL raises many types for bad bytes.
    raise BinFormatError(
        f"{path}: image {index} is not a JPEG/PNG image"
        f" ({type(e).__name__}: {e})"
    ) from None
  # Check the header size before decoding any pixels (no decompression bomb).
  if img.size != (IMAGE_SIZE, IMAGE_SIZE):
    raise BinFormatError(
        f"{path}: image {index} is {img.size[0]}x{img.size[1]}, expected"
        f" aligned {IMAGE_SIZE}x{IMAGE_SIZE} faces"
    )
  return img


def decode_image(data: bytes, path: str = "<bin>", index: int = 0):
  """Decodes one encoded face to uint8 RGB [112, 112, 3].

  Args:
    data: JPEG or PNG bytes.
    path: the source file, for error messages.
    index: the image index in the file, for error messages.

  Returns:
    The decoded image, uint8 HWC RGB.

  Raises:
    BinFormatError: not JPEG/PNG, truncated or corrupt, or not 112x112.
  """
  img = _open_image(data, path, index)
  try:
    img.load()
    array = np.asarray(img.convert("RGB"), dtype=np.uint8)
  except Exception as e:
    raise BinFormatError(
        f"{path}: image {index} cannot be decoded ({type(e).__name__}: {e})"
    ) from None
  return array


def _check_structure(obj, path: str) -> tuple[tuple[bytes, ...], np.ndarray]:
  """Checks `(list of 2N bytes, list of N bools)`; returns them."""
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise BinFormatError(
        f"{path}: expected a pickled (images, issame) pair, got"
        f" {type(obj).__name__}"
        + (f" of length {len(obj)}" if isinstance(obj, (tuple, list)) else "")
    )
  images, issame = obj
  if not isinstance(images, (list, tuple)):
    raise BinFormatError(
        f"{path}: images must be a list of bytes, got {type(images).__name__}"
    )
  if not isinstance(issame, (list, tuple)):
    raise BinFormatError(
        f"{path}: issame must be a list of booleans, got"
        f" {type(issame).__name__}"
    )
  for i, item in enumerate(images):
    if not isinstance(item, (bytes, bytearray)):
      raise BinFormatError(
          f"{path}: images[{i}] is {type(item).__name__}, expected bytes"
      )
  for i, item in enumerate(issame):
    if not isinstance(item, bool):
      raise BinFormatError(
          f"{path}: issame[{i}] is {type(item).__name__} {item!r}, expected"
          " a bool"
      )
  if not issame:
    raise BinFormatError(f"{path}: no pairs")
  if len(images) != 2 * len(issame):
    raise BinFormatError(
        f"{path}: {len(images)} images for {len(issame)} pairs (need exactly"
        " 2 per pair)"
    )
  return tuple(bytes(b) for b in images), np.array(issame, dtype=bool)


def read_bin(
    path: str | os.PathLike,
    *,
    validate_images: bool = True,
    progress_bar: bool = False,
) -> VerificationBin:
  """Reads and validates a verification `.bin` without running anything in it.

  Args:
    path: the `.bin` file.
    validate_images: decode every image once to check it (recommended: a
      broken file then fails here, before any model runs).
    progress_bar: show the images being checked (`synthdistill_jax.progress`).

  Returns:
    A `VerificationBin`.

  Raises:
    BinFormatError: a missing, hostile or malformed file (one-line message).
  """
  path = str(path)
  try:
    with open(path, "rb") as f:
      obj = safe_pickle.load(
          f, allowed=safe_pickle.NUMPY_BOOL, encoding="bytes", source=path
      )
  except OSError as e:
    raise BinFormatError(f"{path}: cannot read ({e.strerror})") from None
  except (safe_pickle.UnsafePickleError, pickle.UnpicklingError) as e:
    raise BinFormatError(
        f"{e} [a .bin holds only a list of image bytes and a list of bools]"
    ) from None
  images, issame = _check_structure(obj, path)
  if validate_images:
    checked = progress.create(
        images,
        total=len(images),
        desc=f"{pathlib.Path(path).stem}: checking images",
        unit="img",
        enabled=progress_bar,
    )
    with checked:
      for i, data in enumerate(checked):
        decode_image(data, path, i)
  return VerificationBin(
      path=path, name=pathlib.Path(path).stem, images=images, issame=issame
  )


def iterate_batches(
    vbin: VerificationBin, batch_size: int
) -> Iterator[np.ndarray]:
  """Streams the decoded images in file order.

  Args:
    vbin: a set from `read_bin`.
    batch_size: images per batch; the last batch may be smaller.

  Yields:
    uint8 NHWC RGB batches [b, 112, 112, 3].
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  for start in range(0, vbin.num_images, batch_size):
    chunk = vbin.images[start : start + batch_size]
    yield np.stack(
        [decode_image(b, vbin.path, start + j) for j, b in enumerate(chunk)]
    )


def encode_image(image: np.ndarray, image_format: str = "PNG") -> bytes:
  """Encodes a uint8 HWC RGB image as PNG (lossless) or JPEG bytes."""
  buf = io.BytesIO()
  kwargs = {"quality": 95} if image_format.upper() == "JPEG" else {}
  Image.fromarray(np.asarray(image, np.uint8)).save(
      buf, format=image_format, **kwargs
  )
  return buf.getvalue()


def write_bin(
    path: str | os.PathLike,
    images: Sequence[np.ndarray] | np.ndarray,
    issame: Sequence[bool] | np.ndarray,
    *,
    image_format: str = "PNG",
) -> pathlib.Path:
  """Writes a `.bin` in the insightface layout (pickle protocol 2).

  Args:
    path: output file.
    images: 2N uint8 [112, 112, 3] RGB images; pair i = images 2i, 2i+1.
    issame: N booleans.
    image_format: 'PNG' (lossless) or 'JPEG'.

  Returns:
    The path written.
  """
  issame = [bool(x) for x in issame]
  if len(images) != 2 * len(issame):
    raise ValueError(f"{len(images)} images for {len(issame)} pairs")
  encoded = [encode_image(img, image_format) for img in images]
  path = pathlib.Path(path)
  with open(path, "wb") as f:
    pickle.dump((encoded, issame), f, protocol=2)
  return path
