"""Checksums of saved arrays: exact across shardings, every bit counted."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_dtypes
import numpy as np
import pytest

from synthdistill_jax import integrity


def _tree():
  rng = np.random.default_rng(0)
  return {
      "f32": rng.standard_normal((16, 6, 5)).astype(np.float32),
      "bf16": rng.standard_normal((8, 4)).astype(ml_dtypes.bfloat16),
      "i32": np.arange(-3, 13, dtype=np.int32),
      "u8": np.arange(10, dtype=np.uint8),
      "flags": np.array([True, False, True]),
      "scalar": np.float32(3.5),
      "empty": np.zeros((0, 4), np.float32),
  }


@pytest.mark.devices(8)
def test_checksums_do_not_depend_on_the_sharding():
  tree = _tree()
  want = integrity.checksums(tree)
  assert sorted(want) == sorted(tree)
  assert len(set(want.values())) == len(want)  # nothing collides here
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  layouts = [
      {"f32": P("a", "b"), "bf16": P("b", None), "i32": P("a")},
      {"f32": P(None, None, None), "bf16": P("a", "b"), "i32": P(("a", "b"))},
  ]
  for specs in layouts:
    placed = {
        k: jax.device_put(v, NamedSharding(mesh, specs.get(k, P())))
        for k, v in tree.items()
    }
    assert integrity.checksums(placed) == want
  # One array on one device (what a replicated CPU run saves).
  assert integrity.checksums(jax.tree.map(jnp.asarray, tree)) == want


def test_every_changed_bit_changes_the_checksum():
  x = np.random.default_rng(1).standard_normal((5, 7)).astype(np.float32)
  want = integrity.checksums({"x": x})["x"]
  words = x.view(np.uint32).reshape(-1)
  seen = set()
  for i in range(words.size):
    for bit in range(32):
      y = words.copy()
      y[i] ^= np.uint32(1 << bit)
      got = integrity.checksums({"x": y.view(np.float32).reshape(x.shape)})
      assert got["x"] != want, (i, bit)
      seen.add(got["x"])
  assert len(seen) == words.size * 32
  # Two elements swapped.
  swapped = x.copy().reshape(-1)
  swapped[[3, 20]] = swapped[[20, 3]]
  assert integrity.checksums({"x": swapped.reshape(x.shape)})["x"] != want


@pytest.mark.devices(8)
def test_chunked_and_sharded_passes_agree(monkeypatch):
  # Shards are summed at their global positions in chunks; small chunks
  # make every path (whole array, shard, chunk boundaries) meet.
  monkeypatch.setattr(integrity, "_CHUNK", 7)
  x = np.random.default_rng(2).standard_normal((12, 8)).astype(np.float32)
  whole = integrity.checksums({"x": x})
  monkeypatch.setattr(integrity, "_CHUNK", 1 << 22)
  assert integrity.checksums({"x": x}) == whole
  mesh = jax.make_mesh((4, 2), ("a", "b"))
  monkeypatch.setattr(integrity, "_CHUNK", 7)
  placed = jax.device_put(x, NamedSharding(mesh, P("b", "a")))
  assert integrity.checksums({"x": placed}) == whole


def test_mismatches_names_changed_missing_and_extra_arrays():
  saved = {"a": "1", "b": "2", "c": "3"}
  assert integrity.mismatches(saved, dict(saved)) == []
  assert integrity.mismatches(saved, {"a": "1", "b": "9", "d": "4"}) == [
      "b",
      "c",
      "d",
  ]
