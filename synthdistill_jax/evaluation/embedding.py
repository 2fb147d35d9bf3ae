"""Embeds faces and their flips: one jitted call per fixed-size batch.

Images are normalised `(x / 255 - 0.5) / 0.5` for every network, as
insightface's evaluation does; each image and its horizontal flip are
embedded in one jitted call of a fixed batch size (the last batch is padded),
sharded over all devices on a 1-D 'data' mesh.
"""

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

Embedder = Callable[[Iterable[np.ndarray]], tuple[np.ndarray, np.ndarray]]


def normalize_images(images: jax.Array) -> jax.Array:
  """uint8 NHWC -> float32 `(x / 255 - 0.5) / 0.5` (insightface eval)."""
  return (images.astype(jnp.float32) / 255.0 - 0.5) / 0.5


class BatchEmbedder:
  """A jitted embedding program of one batch size, reused for any variables.

  `embedder(variables, batches) -> (emb, emb_flip)`. Images are laid out over every device of `mesh` (global arrays built from
  the host batch, which every process holds, so it works with several
  processes); the outputs are replicated, so each process reads its local
  copy rather than `np.asarray` of an array it cannot address.

  Attributes:
    size: images per device call (a multiple of the mesh size).
    num_traces: how many times the program was traced (compiled); stays 1
      while variables keep their shapes and shardings.
  """

  def __init__(self, module, mesh: jax.sharding.Mesh, batch_size: int):
    self.size = -(-batch_size // mesh.size) * mesh.size
    self.num_traces = 0
    self._data = jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(mesh.axis_names)
    )
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    size = self.size

    def embed_batch(variables, images):
      self.num_traces += 1  # Runs at trace time only.
      x = normalize_images(images)
      both = jnp.concatenate([x, x[:, :, ::-1, :]], axis=0)
      out = module.apply(variables, both, train=False).astype(jnp.float32)
      return out[:size], out[size:]

    self._embed_batch = jax.jit(
        embed_batch, out_shardings=(replicated, replicated)
    )

  def _global_batch(self, padded: np.ndarray) -> jax.Array:
    return jax.make_array_from_callback(
        padded.shape, self._data, lambda index: padded[index]
    )

  def __call__(
      self, variables, batches: Iterable[np.ndarray]
  ) -> tuple[np.ndarray, np.ndarray]:
    """Embeds every image of `batches` and its horizontal flip.

    Args:
      variables: the model's variables (global arrays on the mesh).
      batches: uint8 [b, 112, 112, 3] batches of any sizes.

    Returns:
      float32 `(emb, emb_flip)`, one row per image, in order.
    """
    outputs, counts = [], []
    for batch in batches:
      for start in range(0, len(batch), self.size):
        chunk = np.asarray(batch[start : start + self.size], np.uint8)
        padded = np.zeros((self.size,) + chunk.shape[1:], np.uint8)
        padded[: len(chunk)] = chunk
        # Dispatch is asynchronous: decoding the next batch overlaps this.
        outputs.append(self._embed_batch(variables, self._global_batch(padded)))
        counts.append(len(chunk))
    if not outputs:
      raise ValueError("nothing to embed")

    def local(x, n):  # Replicated: every process holds the whole array.
      return np.asarray(x.addressable_data(0))[:n]

    emb = np.concatenate([local(o[0], n) for o, n in zip(outputs, counts)])
    flip = np.concatenate([local(o[1], n) for o, n in zip(outputs, counts)])
    return emb, flip


def create_embedder(module, variables, batch_size: int = 64) -> Embedder:
  """Builds `embed(batches) -> (emb, emb_flip)` for a Flax face model.

  Args:
    module: Flax module, `module.apply(variables, x, train=False) -> [B, D]`.
    variables: its variables (host arrays).
    batch_size: images per device call; rounded up to a multiple of the
      device count. Every call has this size (no recompiles).

  Returns:
    A function mapping an iterable of uint8 [b, 112, 112, 3] batches to the
    float32 embeddings of the images and of their horizontal flips.
  """
  devices = jax.devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  embedder = BatchEmbedder(module, mesh, batch_size)
  variables = put_replicated(mesh, variables)
  return functools.partial(embedder, variables)


def put_replicated(mesh: jax.sharding.Mesh, variables) -> Any:
  """Host leaves -> replicated global arrays; global arrays stay as they are."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

  def put(x):
    if isinstance(x, jax.Array):
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, replicated, lambda i: x[i])

  return jax.tree.map(put, variables)
