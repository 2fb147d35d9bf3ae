"""A pickle reader that runs nothing from the file.

`pickle.load` imports and calls whatever globals a file names, so a pickle can
run arbitrary code. `load` instead resolves every global through an explicit
allow-list that maps `(module, name)` to a callable of ours; any other global
is refused with `UnsafePickleError` before anything is called. With an empty
allow-list only plain containers, numbers, strings and bytes can be read;
`NUMPY_BOOL` adds numpy boolean scalars (`numpy.bool_`), and only those.
"""

import io
import pickle
from typing import Any, Callable, Mapping


class UnsafePickleError(pickle.UnpicklingError):
  """The file names a global outside the allow-list, or is not a pickle."""


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
  """Stands in for `_codecs.encode` (how Python 3 pickles `bytes`, protocol 2).

  Only the latin-1 text-to-bytes form is accepted; nothing else is called.
  """
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise UnsafePickleError(
        f"refused _codecs.encode({type(text).__name__}, {encoding!r})"
    )
  return text.encode("latin1")


# Globals that only rebuild plain data and are always allowed.
_ALWAYS_ALLOWED = {("_codecs", "encode"): _latin1_bytes}

# The pickle state of numpy's boolean dtype, `np.dtype(bool).__reduce__()[2]`
# (byte order '|' arrives as bytes from files written by Python 2).
_BOOL_DTYPE_STATE = (3, "|", None, None, None, -1, -1, 0)


def _text(value):
  return value.decode("latin1") if isinstance(value, bytes) else value


class _BoolDtype:
  """Stands in for `numpy.dtype('b1')` while unpickling; nothing else.

  A stand-in rather than the real dtype: pickle calls `__setstate__` on what
  `numpy.dtype(...)` returns, which must not touch numpy's shared dtype.
  """

  def __setstate__(self, state):
    state = tuple(_text(v) for v in state) if isinstance(state, tuple) else ()
    if state != _BOOL_DTYPE_STATE:
      raise UnsafePickleError(f"refused numpy bool dtype state {state!r}")


def _numpy_dtype(name, align=False, copy=True):
  """Stands in for `numpy.dtype(name, align, copy)`: only 'b1' (bool)."""
  del align, copy  # Always (False, True) for a scalar's dtype.
  if _text(name) != "b1":
    raise UnsafePickleError(
        f"refused numpy.dtype({_text(name)!r}) (only numpy booleans are"
        " allowed)"
    )
  return _BoolDtype()


def _numpy_bool_scalar(dtype, data=None) -> bool:
  """Stands in for numpy's `multiarray.scalar(dtype, data)`: a bool only."""
  if not isinstance(dtype, _BoolDtype):
    raise UnsafePickleError("refused numpy scalar of a non-boolean dtype")
  data = data.encode("latin1") if isinstance(data, str) else data
  if data not in (b"\x00", b"\x01"):
    raise UnsafePickleError(f"refused numpy bool scalar data {data!r}")
  return data == b"\x01"


# What `pickle.dumps(numpy.bool_(x))` references (numpy 1.x spells the
# module `numpy.core.multiarray`, numpy 2.x `numpy._core.multiarray`): each
# mapped to a stand-in that accepts a boolean and refuses anything else.
NUMPY_BOOL = {
    ("numpy.core.multiarray", "scalar"): _numpy_bool_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_bool_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class _Unpickler(pickle.Unpickler):
  """`pickle.Unpickler` whose globals come only from an allow-list."""

  def __init__(
      self,
      file,
      allowed: Mapping[tuple[str, str], Callable[..., Any]],
      persistent_load: Callable[[Any], Any] | None,
      encoding: str,
      source: str,
  ):
    super().__init__(file, encoding=encoding)
    self._allowed = {**_ALWAYS_ALLOWED, **allowed}
    self._persistent_load = persistent_load
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"{self._source}: refused global {module}.{name} (not on the"
          " allow-list; nothing from the file was run)"
      ) from None

  def persistent_load(self, pid: Any) -> Any:
    if self._persistent_load is None:
      raise UnsafePickleError(
          f"{self._source}: unexpected persistent id {pid!r}"
      )
    return self._persistent_load(pid)


def load(
    file,
    allowed: Mapping[tuple[str, str], Callable[..., Any]] | None = None,
    *,
    persistent_load: Callable[[Any], Any] | None = None,
    encoding: str = "ASCII",
    source: str = "<pickle>",
) -> Any:
  """Unpickles `file` (a binary file object or bytes) safely.

  Args:
    file: a binary file object or a bytes object.
    allowed: `(module, name) -> callable` used in place of each global.
    persistent_load: handler for persistent ids (torch storages), if any.
    encoding: how Python 2 `str` objects are decoded ('bytes' keeps bytes).
    source: what to call the file in error messages (its path).

  Returns:
    The unpickled object.

  Raises:
    UnsafePickleError: a global outside `allowed`, or a corrupt file.
  """
  if isinstance(file, (bytes, bytearray, memoryview)):
    file = io.BytesIO(bytes(file))
  unpickler = _Unpickler(file, allowed or {}, persistent_load, encoding, source)
  try:
    return unpickler.load()
  except UnsafePickleError as e:
    if str(e).startswith(source):
      raise
    # Raised by a stand-in, which does not know the file's name.
    raise UnsafePickleError(f"{source}: {e}") from None
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
    raise UnsafePickleError(
        f"{source}: not a readable pickle ({type(e).__name__}: {e})"
    ) from None
