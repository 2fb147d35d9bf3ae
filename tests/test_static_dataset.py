"""The static synthetic set: TFDS write/read round trip without TensorFlow."""

import subprocess
import sys

import numpy as np
import pytest

from synthdistill_jax.data import static_dataset

W_DIM, EMB_DIM = 8, 16


def _stream(num, batch, seed=0):
  rng = np.random.default_rng(seed)
  for start in range(0, num, batch):
    b = min(batch, num - start)
    yield {
        "w": rng.standard_normal((b, W_DIM)).astype(np.float32),
        "face": rng.integers(0, 256, (b, 112, 112, 3), dtype=np.uint8),
        "teacher": rng.standard_normal((b, EMB_DIM)).astype(np.float32),
    }


@pytest.fixture(name="written", scope="module")
def fixture_written(tmp_path_factory):
  directory = tmp_path_factory.mktemp("static")
  path = static_dataset.write_static_dataset(
      directory,
      _stream(37, 10),
      num_examples=37,
      w_dim=W_DIM,
      emb_dim=EMB_DIM,
      metadata={"generator": "test", "seed": 3},
  )
  return directory, path


def test_round_trip_is_exact(written):
  directory, path = written
  assert path.parent.parent == directory
  data = static_dataset.StaticDataset(directory)  # Finds the version dir.
  assert len(data) == 37
  assert data.metadata == {"generator": "test", "seed": 3}
  want = {
      k: np.concatenate([b[k] for b in _stream(37, 10)])
      for k in ("w", "face", "teacher")
  }
  (batch,) = data.batches(
      37, seed=0, epoch=0, drop_remainder=False
  )  # Everything at once.
  assert sorted(batch["index"].tolist()) == list(range(37))
  for key in ("w", "face", "teacher"):
    assert batch[key].dtype == want[key].dtype
    np.testing.assert_array_equal(batch[key], want[key][batch["index"]])


def test_batches_are_deterministic_and_sharded(written):
  data = static_dataset.StaticDataset(written[1])

  def order(**kw):
    return np.concatenate(
        [b["index"] for b in data.batches(4, drop_remainder=False, **kw)]
    )

  np.testing.assert_array_equal(order(seed=1, epoch=0), order(seed=1, epoch=0))
  assert not np.array_equal(order(seed=1, epoch=0), order(seed=1, epoch=1))
  shards = [
      order(seed=1, epoch=2, shard_index=i, num_shards=3) for i in range(3)
  ]
  assert [len(s) for s in shards] == [12, 12, 12]  # 37 // 3 each.
  assert len(set(np.concatenate(shards).tolist())) == 36
  dropped = list(data.batches(5, seed=1, epoch=0))
  assert [len(b["w"]) for b in dropped] == [5] * 7
  with pytest.raises(ValueError, match="shard_index"):
    next(data.batches(4, seed=0, epoch=0, shard_index=3, num_shards=3))


def test_bad_streams_fail_clearly(tmp_path):
  def bad():
    yield {"w": np.zeros((2, W_DIM)), "face": np.zeros((2, 64, 64, 3))}

  with pytest.raises(ValueError, match="'face' has shape"):
    static_dataset.write_static_dataset(
        tmp_path, bad(), num_examples=2, w_dim=W_DIM, emb_dim=EMB_DIM
    )
  with pytest.raises(ValueError, match="gave 5 examples, but num_examples"):
    static_dataset.write_static_dataset(
        tmp_path / "b",
        _stream(5, 5),
        num_examples=6,
        w_dim=W_DIM,
        emb_dim=EMB_DIM,
    )
  with pytest.raises(FileNotFoundError, match="no static dataset"):
    static_dataset.StaticDataset(tmp_path / "nothing")

  def nan_target():
    batch = next(_stream(3, 3))
    batch["teacher"][1, 4] = np.nan
    yield batch

  with pytest.raises(ValueError, match="'teacher' has 1 non-finite value"):
    static_dataset.write_static_dataset(
        tmp_path / "c",
        nan_target(),
        num_examples=3,
        w_dim=W_DIM,
        emb_dim=EMB_DIM,
    )


def test_features_are_checked_against_the_student(written):
  data = static_dataset.StaticDataset(written[1])
  data.check_features(EMB_DIM)
  with pytest.raises(ValueError) as info:
    data.check_features(2 * EMB_DIM)
  assert str(info.value) == (
      f"its 'teacher' feature is float32 [{EMB_DIM}], the trainer needs"
      f" float32 [{2 * EMB_DIM}] (the student embeds to {2 * EMB_DIM}"
      " dimensions: write the set with this config's teacher, or change the"
      " student's embedding size)"
  )


def test_reading_does_not_import_tensorflow(written):
  code = (
      "import sys; from synthdistill_jax.data import static_dataset as s;"
      f" d = s.StaticDataset({str(written[1])!r});"
      " next(d.batches(4, seed=0, epoch=0));"
      " assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  result = subprocess.run(
      [sys.executable, "-c", code], capture_output=True, text=True, check=False
  )
  assert result.returncode == 0, result.stderr[-2000:]
