"""The offline "static" synthetic set: generated faces with teacher targets.

SynthDistill's static variant trains on a fixed set of generated faces
instead of fresh ones every batch. The set is a TFDS dataset (array_record
files, Tensor features), written and read without TensorFlow:

  path = write_static_dataset(directory, batches, num_examples=100_000,
                              w_dim=512, emb_dim=512, metadata={...})
  data = StaticDataset(path)
  for batch in data.batches(128, seed=2021, epoch=0):
    batch["face"]     # uint8 [128, 112, 112, 3], the crop quantised to uint8
    batch["w"]        # float32 [128, w_dim], the latent that made it
    batch["teacher"]  # float32 [128, emb_dim], teacher embedding of `face`

Each example also stores `index`, its position in the input stream. Batches
are a permutation of the examples fixed by (seed, epoch); with several hosts,
each takes its own equal slice of that permutation (`shard_index` of
`num_shards`), so every host runs the same number of steps.
"""

import os
import pathlib
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import tensorflow_datasets as tfds

from etils import epath

NAME = "static_synthetic_faces"
FACE_SHAPE = (112, 112, 3)
FEATURES = ("w", "face", "teacher", "index")
FILE_FORMAT = "array_record"


class StaticSyntheticFaces(tfds.core.GeneratorBasedBuilder):
  """Generated faces, their latents and their teacher embeddings."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "w, face (uint8), teacher embedding, index."}

  def __init__(
      self,
      *,
      w_dim: int,
      emb_dim: int,
      examples: Iterable[Mapping[str, np.ndarray]] = (),
      num_examples: int = 0,
      metadata: Mapping[str, Any] | None = None,
      **kwargs,
  ):
    self._w_dim = int(w_dim)
    self._emb_dim = int(emb_dim)
    self._examples = examples
    self._num_examples = int(num_examples)
    self._metadata = dict(metadata or {})
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS would look the file up through `importlib_resources`, which is not
    # a declared dependency; it is right here.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="SynthDistill static set: StyleGAN2 faces + targets.",
        features=tfds.features.FeaturesDict(
            {
                "w": tfds.features.Tensor(
                    shape=(self._w_dim,), dtype=np.float32
                ),
                "face": tfds.features.Tensor(shape=FACE_SHAPE, dtype=np.uint8),
                "teacher": tfds.features.Tensor(
                    shape=(self._emb_dim,), dtype=np.float32
                ),
                "index": tfds.features.Scalar(dtype=np.int64),
            }
        ),
        metadata=tfds.core.MetadataDict(self._metadata),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: examples come from the caller.
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    count = 0
    for b, batch in enumerate(self._examples):
      arrays = self._check_batch(b, batch)
      for j in range(len(arrays["w"])):
        yield count, {
            "w": arrays["w"][j],
            "face": arrays["face"][j],
            "teacher": arrays["teacher"][j],
            "index": count,
        }
        count += 1
    if count != self._num_examples:
      raise ValueError(
          f"the example stream gave {count} examples, but num_examples is"
          f" {self._num_examples}"
      )

  def _check_batch(self, b: int, batch) -> dict[str, np.ndarray]:
    shapes = {
        "w": (self._w_dim,),
        "face": FACE_SHAPE,
        "teacher": (self._emb_dim,),
    }
    arrays = {}
    for key, shape in shapes.items():
      if key not in batch:
        raise ValueError(f"batch {b}: missing {key!r}")
      value = np.asarray(batch[key])
      if value.shape[1:] != shape:
        raise ValueError(
            f"batch {b}: {key!r} has shape {value.shape}, expected [B,"
            f" {', '.join(map(str, shape))}]"
        )
      if key == "face" and value.dtype != np.uint8:
        raise ValueError(f"batch {b}: 'face' must be uint8, got {value.dtype}")
      if key != "face" and not np.isfinite(value).all():
        raise ValueError(
            f"batch {b}: {key!r} has {int((~np.isfinite(value)).sum())}"
            " non-finite value(s) (NaN/Inf); refused"
        )
      arrays[key] = value.astype(np.uint8 if key == "face" else np.float32)
    if len({len(v) for v in arrays.values()}) != 1:
      raise ValueError(f"batch {b}: w, face and teacher differ in length")
    return arrays


def write_static_dataset(
    directory: str | os.PathLike,
    examples: Iterable[Mapping[str, np.ndarray]],
    *,
    num_examples: int,
    w_dim: int,
    emb_dim: int,
    metadata: Mapping[str, Any] | None = None,
) -> pathlib.Path:
  """Writes the static set as a TFDS dataset (array_record, no TensorFlow).

  Args:
    directory: TFDS data directory to write into.
    examples: iterable of batches `{'w', 'face', 'teacher'}` of numpy arrays
      ([B, w_dim] float32, [B, 112, 112, 3] uint8, [B, emb_dim] float32).
    num_examples: how many examples the stream holds (checked).
    w_dim: latent size.
    emb_dim: teacher embedding size.
    metadata: JSON-serialisable facts (generator, teacher, seed, ...),
      stored in the dataset's `metadata.json`.

  Returns:
    The dataset folder (`directory/static_synthetic_faces/1.0.0`).
  """
  builder = StaticSyntheticFaces(
      w_dim=w_dim,
      emb_dim=emb_dim,
      examples=examples,
      num_examples=num_examples,
      metadata=metadata,
      data_dir=str(directory),
      file_format=FILE_FORMAT,
  )
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(
          download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS
      )
  )
  return pathlib.Path(builder.data_dir)


def _find_dataset_dir(directory: pathlib.Path) -> pathlib.Path:
  if (directory / "dataset_info.json").is_file():
    return directory
  found = sorted(directory.glob(f"{NAME}/*/dataset_info.json"))
  if len(found) != 1:
    raise FileNotFoundError(
        f"{directory}: no static dataset here (expected dataset_info.json"
        f" or {NAME}/<version>/dataset_info.json)"
    )
  return found[0].parent


class StaticDataset:
  """Random-access reader of a static set (TFDS data source, no TensorFlow).

  Attributes:
    path: the dataset folder.
    info: the `tfds.core.DatasetInfo` (features, metadata, sizes).
  """

  def __init__(self, directory: str | os.PathLike):
    self.path = _find_dataset_dir(pathlib.Path(directory))
    builder = tfds.builder_from_directory(str(self.path))
    self.info = builder.info
    self._source = builder.as_data_source(split="train")

  def __len__(self) -> int:
    return len(self._source)

  def check_features(self, emb_dim: int) -> None:
    """Refuses a set whose features the trainer cannot use.

    Read from `features.json` alone (no example is read): another TFDS
    dataset, faces of another size, or targets of a teacher whose embedding
    size differs from the student's (which would otherwise fail deep inside
    the compiled step, or train on the wrong targets).

    Args:
      emb_dim: the student's embedding size.

    Raises:
      ValueError: one line naming the feature and what was expected.
    """
    features = self.info.features
    want = {
        "face": (FACE_SHAPE, np.uint8, "uint8 face crops"),
        "teacher": (
            (emb_dim,),
            np.float32,
            f"the student embeds to {emb_dim} dimensions: write the set with"
            " this config's teacher, or change the student's embedding size",
        ),
    }
    for name, (shape, dtype, why) in want.items():
      if name not in features:
        raise ValueError(
            f"has no {name!r} feature (it has {', '.join(features.keys())}):"
            " not a static set written by tools/make_static_dataset.py"
        )
      got_shape = tuple(features[name].shape)
      got_dtype = np.dtype(features[name].np_dtype)
      if (got_shape, got_dtype) != (shape, np.dtype(dtype)):
        raise ValueError(
            f"its {name!r} feature is {got_dtype.name} {list(got_shape)}, the"
            f" trainer needs {np.dtype(dtype).name} {list(shape)} ({why})"
        )

  def batches_per_epoch(
      self, batch_size: int, num_shards: int = 1, drop_remainder: bool = True
  ) -> int:
    """Batches `batches` yields per epoch and shard."""
    per_shard = len(self) // num_shards
    return (
        per_shard // batch_size
        if drop_remainder
        else -(-per_shard // batch_size)
    )

  @property
  def metadata(self) -> dict[str, Any]:
    return dict(self.info.metadata or {})

  def epoch_indices(
      self, *, seed: int, epoch: int, shard_index: int = 0, num_shards: int = 1
  ) -> np.ndarray:
    """This shard's example indices for an epoch, in visiting order."""
    if not 0 <= shard_index < num_shards:
      raise ValueError(f"shard_index {shard_index} not in [0, {num_shards})")
    order = np.random.default_rng([seed, epoch]).permutation(len(self))
    per_shard = len(self) // num_shards
    return order[shard_index * per_shard : (shard_index + 1) * per_shard]

  def batches(
      self,
      batch_size: int,
      *,
      seed: int,
      epoch: int,
      shard_index: int = 0,
      num_shards: int = 1,
      drop_remainder: bool = True,
      start_batch: int = 0,
  ) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of numpy batches, deterministic given seed and epoch.

    Args:
      batch_size: examples per batch (per host).
      seed: shuffling seed.
      epoch: epoch number; each epoch has its own permutation.
      shard_index: this host's index (`jax.process_index()`).
      num_shards: number of hosts (`jax.process_count()`).
      drop_remainder: drop the last, smaller batch.
      start_batch: skip this many batches without reading them (a resumed
        run seeks to its position).

    Yields:
      `{'w', 'face', 'teacher', 'index'}` numpy batches.
    """
    indices = self.epoch_indices(
        seed=seed, epoch=epoch, shard_index=shard_index, num_shards=num_shards
    )
    stop = len(indices)
    if drop_remainder:
      stop -= stop % batch_size
    for start in range(start_batch * batch_size, stop, batch_size):
      records = self._source.__getitems__(
          indices[start : start + batch_size].tolist()
      )
      yield {k: np.stack([r[k] for r in records]) for k in FEATURES}


def render_examples(config, num_examples: int, seed: int):
  """Yields `{w, face, teacher}` numpy batches of the config's networks.

  The generator, teacher, mesh and their placement come from
  `experiment.create`, the trainer's own setup, so the set holds exactly the
  faces and targets a dynamic run of the same config would see.

  Args:
    config: an experiment config (generator, teacher, batch size); its
      sampler is ignored (the faces are rendered, never read).
    num_examples: total examples; the last batch may be smaller.
    seed: seed of the latents and pixel noise.

  Yields:
    Batches: w `[b, w_dim]` float32, face `[b, 112, 112, 3]` uint8, teacher
    `[b, emb]` float32.
  """
  # Imported here: the dataset reader must not pull in the networks.
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from synthdistill_jax import distill  # pylint: disable=g-import-not-at-top
  from synthdistill_jax import experiment  # pylint: disable=g-import-not-at-top
  from synthdistill_jax import faces  # pylint: disable=g-import-not-at-top

  config = config.copy_and_resolve_references()
  config.sampler.kind = "dynamic"
  exp = experiment.create(config)
  spec, batch = exp.spec, exp.spec.batch_size

  @jax.jit
  def make_batch(gen_vars, teacher_vars, key):
    w = distill.sample_latents(spec, gen_vars, jax.random.fold_in(key, 0))
    x = distill.render_faces(spec, gen_vars, w, jax.random.fold_in(key, 1))
    face = faces.quantise_faces(x)
    t = distill.embed_teacher(
        spec, teacher_vars, face.astype(jnp.float32) / 255.0
    )
    return w, face, t

  root = jax.random.PRNGKey(seed)
  for i, start in enumerate(range(0, num_examples, batch)):
    w, face, t = jax.device_get(
        make_batch(exp.gen_vars, exp.teacher_vars, jax.random.fold_in(root, i))
    )
    n = min(batch, num_examples - start)
    yield {"w": w[:n], "face": face[:n], "teacher": np.asarray(t[:n])}
