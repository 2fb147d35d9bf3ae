"""Checksums of saved arrays, the same however the arrays are sharded.

orbax stores arrays zstd-compressed without a checksum of the data, so bytes
changed on disk (a bad disk, a copy cut short and patched, a stray write)
can restore without an error as different numbers: in a TinyFaR checkpoint,
8 bytes changed in a data file gave 3 to 6,113 wrong values and no error.
Checkpoints and model folders therefore carry a checksum per array, written
with them and compared on every restore or load.

Each array is read as 32-bit words `u[i]` (its bits in C order; 16- and
8-bit elements widened, 64-bit ones split) and summed modulo 2**32 in two
lanes, `sum(u[i] * (2i + 1))` and `sum(mix(u[i]) ^ (i * 0x9E3779B1))`.
Sums modulo 2**32 do not depend on the order of the terms, so each shard
adds its own part at its global positions and the parts of all processes
add up to the same 64 bits as the whole array on one host; any single
changed bit changes the first lane (an odd multiplier is invertible).
"""

import re
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

ALGORITHM = "synthdistill-sum64/1"

# Elements per numpy pass (bounds the temporaries, about 16 bytes each).
_CHUNK = 1 << 22
_GOLDEN = np.uint32(0x9E3779B1)
_MIX = np.uint32(0x045D9F3B)


def leaf_name(path) -> str:
  """`a/b/0/c` for a tree path of dict keys, indices or dataclass fields."""
  return "/".join(re.findall(r"\w+", jax.tree_util.keystr(path)))


def _words(block: np.ndarray) -> np.ndarray:
  """The bits of `block` as flat uint32 words (several per 64-bit element)."""
  a = np.ascontiguousarray(block).reshape(-1)
  if a.dtype == np.bool_:
    a = a.view(np.uint8)
  size = a.dtype.itemsize
  if size % 4 == 0:
    return a.view(np.uint32)
  return a.view(np.dtype(f"u{size}")).astype(np.uint32)


def _partial(block: np.ndarray, starts, shape) -> np.ndarray:
  """Both lanes over `block`, which sits at `starts` of an array `shape`."""
  block = np.asarray(block)
  whole = tuple(block.shape) == tuple(shape)
  strides = np.cumprod((1,) + tuple(shape)[:0:-1])[::-1].astype(np.int64)
  words_per = max(block.dtype.itemsize // 4, 1)
  flat_words = _words(block)
  total = np.zeros(2, np.uint32)
  for begin in range(0, block.size, _CHUNK):
    end = min(begin + _CHUNK, block.size)
    if whole:
      flat = np.arange(begin, end, dtype=np.int64)
    else:
      local = np.unravel_index(np.arange(begin, end), block.shape)
      flat = sum(
          (start + m) * stride
          for start, m, stride in zip(starts, local, strides)
      )
      flat = np.asarray(flat, np.int64)
    # Positions wrap modulo 2**32 with the sums (arrays of over 4G words).
    index = (flat[:, None] * words_per + np.arange(words_per)).reshape(-1)
    index = index.astype(np.uint32)
    u = flat_words[begin * words_per : end * words_per]
    v = (u ^ (u >> np.uint32(16))) * _MIX
    v ^= v >> np.uint32(16)
    total += np.array(
        [
            np.sum(u * (index * np.uint32(2) + np.uint32(1)), dtype=np.uint32),
            np.sum(v ^ (index * _GOLDEN), dtype=np.uint32),
        ],
        np.uint32,
    )
  return total


def _leaf_sums(leaf) -> tuple[np.ndarray, bool]:
  """This process's part of both lanes, and whether other processes add."""
  if isinstance(leaf, jax.Array):
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    total = np.zeros(2, np.uint32)
    for shard in leaf.addressable_shards:
      if shard.replica_id:  # Every element is counted once.
        continue
      starts = [s.start or 0 for s in shard.index]
      total += _partial(np.asarray(shard.data), starts, leaf.shape)
    return total, not leaf.is_fully_addressable
  block = np.asarray(leaf)
  return _partial(block, [0] * block.ndim, block.shape), False


def checksums(tree: Any) -> dict[str, str]:
  """A 16-hex-digit checksum per array of `tree` (numpy or global arrays).

  With arrays spread over several processes this is a collective: every
  process must call it with the same tree.

  Args:
    tree: arrays (numpy, or `jax.Array`s with any sharding).

  Returns:
    `leaf_name(path) -> checksum`.
  """
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  names = [leaf_name(path) for path, _ in flat]
  parts = [_leaf_sums(leaf) for _, leaf in flat]
  sums = np.stack([p for p, _ in parts]) if parts else np.zeros((0, 2))
  if any(spread for _, spread in parts):
    gathered = multihost_utils.process_allgather(sums.astype(np.uint32))
    sums = np.sum(np.asarray(gathered, np.uint32), axis=0, dtype=np.uint32)
  return {
      name: f"{int(a):08x}{int(b):08x}" for name, (a, b) in zip(names, sums)
  }


def mismatches(saved: dict[str, str], found: dict[str, str]) -> list[str]:
  """Names of the arrays whose checksums differ (or are in one dict only)."""
  return sorted(
      k for k in set(saved) | set(found) if saved.get(k) != found.get(k)
  )
