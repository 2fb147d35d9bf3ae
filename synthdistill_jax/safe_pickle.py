"""A pickle reader that runs nothing from the file.

`pickle.load` imports and calls whatever globals a file names, so a pickle can
run arbitrary code. `load` instead resolves every global through an explicit
allow-list that maps `(module, name)` to a callable of ours; any other global
is refused with `UnsafePickleError` before anything is called. With an empty
allow-list only plain containers, numbers, strings and bytes can be read.
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
  except UnsafePickleError:
    raise
  except (EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
    raise UnsafePickleError(
        f"{source}: not a readable pickle ({type(e).__name__}: {e})"
    ) from None
