"""The restricted unpickler refuses every global it was not given."""

import os
import pickle

import pytest

from synthdistill_jax import safe_pickle


class _Payload:
  """Would create a file when unpickled by `pickle.load`."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_plain_containers_load():
  data = ([b"abc", b"\x00\xff"], [True, False], {"k": 1.5})
  assert safe_pickle.load(pickle.dumps(data, protocol=2)) == data


def test_python2_str_kept_as_bytes():
  # Protocol-2 SHORT_BINSTRING opcode, as Python 2 writes `str` objects.
  raw = b"\x80\x02U\x03abcq\x00."
  assert safe_pickle.load(raw, encoding="bytes") == b"abc"


def test_payload_refused_and_not_run(tmp_path):
  marker = tmp_path / "pwned"
  blob = pickle.dumps({"x": _Payload(marker)})
  with pytest.raises(safe_pickle.UnsafePickleError, match="system"):
    safe_pickle.load(blob, source="evil.pkl")
  assert not marker.exists()
  # The same bytes really do run code under plain pickle: the test is live.
  pickle.loads(blob)
  assert marker.exists()


def test_allow_list_maps_globals():
  blob = pickle.dumps(complex(1, 2))
  with pytest.raises(safe_pickle.UnsafePickleError, match="builtins.complex"):
    safe_pickle.load(blob)
  allowed = {("builtins", "complex"): lambda re, im: ("c", re, im)}
  assert safe_pickle.load(blob, allowed) == ("c", 1.0, 2.0)


def test_truncated_file_is_one_clear_error():
  blob = pickle.dumps([b"x" * 100, [True]])[:-10]
  with pytest.raises(safe_pickle.UnsafePickleError, match="lfw.bin: not a"):
    safe_pickle.load(blob, source="lfw.bin")
