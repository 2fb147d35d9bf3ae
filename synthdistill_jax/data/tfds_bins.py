"""A TFDS builder for insightface verification `.bin` files (manual download).

The benchmark bins cannot be downloaded automatically; put them (`lfw.bin`,
`cfp_fp.bin`, ...) in a folder and pass it as the manual directory:

  from synthdistill_jax.data import tfds_bins
  builder = tfds_bins.prepare("lfw", manual_dir="~/bins", data_dir="~/tfds")
  pairs = builder.as_data_source("test")   # random access, no TensorFlow

or, by name, once this module is imported:

  builder = tfds.builder("verification_bins/lfw", data_dir=...,
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="~/bins"))

Each example is one pair: `image1`, `image2` (uint8 [112, 112, 3], kept as
the file's own JPEG/PNG bytes and decoded with PIL on read), `issame` and
`index` (the pair's position in the file: TFDS shuffles examples, and the
10 verification folds are contiguous in file order). Files are read with
`verification_bin.read_bin`, so a hostile or malformed `.bin` is refused
before anything is written. Writing and reading use the array_record format
and need no TensorFlow.
"""

import io
import os
import pathlib

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from synthdistill_jax.data import verification_bin

STANDARD_BINS = (
    "lfw",
    "cfp_fp",
    "cfp_ff",
    "agedb_30",
    "calfw",
    "cplfw",
    "vgg2_fp",
)
FILE_FORMAT = "array_record"


def _as_pil_readable(data: bytes, path: str, index: int) -> bytes:
  # RGB JPEG/PNG bytes are kept verbatim; anything else (greyscale, RGBA,
  # palette) is re-encoded losslessly as RGB PNG so a 3-channel image
  # feature decodes it to exactly what `verification_bin` returns.
  img = Image.open(io.BytesIO(data))
  if img.mode == "RGB":
    return data
  pixels = verification_bin.decode_image(data, path, index)
  return verification_bin.encode_image(pixels, "PNG")


class VerificationBins(tfds.core.GeneratorBasedBuilder):
  """Face-verification pairs from insightface `.bin` files (one config each).

  Any other bin name works through an explicit config:
  `VerificationBins(config=tfds.core.BuilderConfig(name="mybench"), ...)`
  reads `mybench.bin` from the manual directory.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Pairs of aligned 112x112 faces from .bin files."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=n) for n in STANDARD_BINS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Place the insightface verification files (lfw.bin, cfp_fp.bin,"
      " agedb_30.bin, ...) in the manual directory; the config name is the"
      " file stem."
  )

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds a package module's file through `importlib_resources`, which
    # etils imports lazily and which is not a declared dependency; the file
    # is right here, so skip the lookup.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    image = tfds.features.Image(shape=(112, 112, 3))
    return tfds.core.DatasetInfo(
        builder=self,
        description=(
            "Face-verification pairs (insightface .bin); pair order in the"
            " file is `index`."
        ),
        features=tfds.features.FeaturesDict(
            {
                "image1": image,
                "image2": image,
                "issame": tfds.features.Scalar(dtype=np.bool_),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        ),
        homepage="https://github.com/deepinsight/insightface",
    )

  def _split_generators(self, dl_manager):
    path = (
        pathlib.Path(dl_manager.manual_dir) / f"{self.builder_config.name}.bin"
    )
    if not path.is_file():
      raise FileNotFoundError(
          f"{path}: not found; {self.MANUAL_DOWNLOAD_INSTRUCTIONS}"
      )
    vbin = verification_bin.read_bin(path)
    return {"test": self._generate_examples(vbin)}

  def _generate_examples(self, vbin: verification_bin.VerificationBin):
    for i, same in enumerate(vbin.issame):
      a, b = 2 * i, 2 * i + 1
      yield i, {
          "image1": _as_pil_readable(vbin.images[a], vbin.path, a),
          "image2": _as_pil_readable(vbin.images[b], vbin.path, b),
          "issame": bool(same),
          "index": i,
      }


def prepare(
    name: str,
    *,
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
) -> VerificationBins:
  """Builds (once) the TFDS dataset of `<manual_dir>/<name>.bin`.

  Args:
    name: the bin's stem ('lfw', 'cfp_fp', or any other name).
    manual_dir: folder holding `<name>.bin`.
    data_dir: TFDS data directory to write into.

  Returns:
    The prepared builder (`.as_data_source('test')` reads it).
  """
  if name in STANDARD_BINS:
    config = name
  else:
    config = tfds.core.BuilderConfig(name=name)
  builder = VerificationBins(
      config=config, data_dir=str(data_dir), file_format=FILE_FORMAT
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir))
  )
  return builder


def read_ordered(data_source) -> tuple[np.ndarray, np.ndarray]:
  """Reads a prepared split back in file order.

  Args:
    data_source: `builder.as_data_source('test')`.

  Returns:
    `(images, issame)`: uint8 [2N, 112, 112, 3] (pair i = rows 2i, 2i+1) and
    bool [N], as `verification_bin` would give them.
  """
  n = len(data_source)
  examples = data_source.__getitems__(list(range(n)))
  examples.sort(key=lambda e: int(e["index"]))
  images = np.stack(
      [img for e in examples for img in (e["image1"], e["image2"])]
  )
  issame = np.array([bool(e["issame"]) for e in examples])
  return images, issame
