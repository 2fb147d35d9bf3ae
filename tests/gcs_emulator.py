"""A local Google Cloud Storage emulator for tests of `gs://` workdirs.

Pod users keep their workdir in a bucket, so every path under it goes through
`etils.epath` and orbax. This module makes a real `gs://bucket/...` path work
on a machine without network: it starts `gcp-storage-emulator` (pure Python,
in memory) in a child process on a free localhost port, creates one bucket and
points every GCS client the project uses at it through environment variables:

  STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT
      gcsfs (epath's `gs://` backend when TensorFlow is absent) and
      google-cloud-storage (orbax asks it whether the bucket has a
      hierarchical namespace, in `all_steps()` and when deleting steps); with
      it set, google-cloud-storage also sends no credentials.
  TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT
      tensorstore's `gcs` kvstore, which writes orbax's array data.
  GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator
      tensorstore sends this bearer token instead of looking for credentials
      (which would try the GCE metadata server).
  FSSPEC_GCS_TOKEN=anon
      gcsfs sends no credentials instead of trying the developer's own.
  NO_GCE_CHECK=true
      gcsfs and google-auth skip probing the GCE metadata server.
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
      gcsfs >= 2026 otherwise asks the Storage Control gRPC API for the bucket
      layout, which the emulator lacks: 60 s timeouts per bucket.
  EPATH_USE_TF=false
      epath uses fsspec/gcsfs for `gs://` even where TensorFlow is installed
      (tf.io.gfile's GCS client is not pointed at the emulator).

The variables stay set while the emulator runs, so subprocesses (a trainer
started with `subprocess`) inherit them; they are restored afterwards. Use the
`gcs_emulator` fixture (one emulator per test session) or `running()`.

Run as a script (`python gcs_emulator.py BUCKET`), this file is the emulator's
child process: it prints its port, then serves until its stdin closes.
"""

import contextlib
import dataclasses
import http
import http.server
import json
import os
import secrets
import select
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

import pytest

# Seconds to wait for the child to print its port or to exit.
_START_TIMEOUT_S = 60
_STOP_TIMEOUT_S = 10


def emulator_env(url: str) -> dict[str, str]:
  """Returns the environment that points the GCS clients at an emulator.

  Args:
    url: the emulator's base URL, e.g. `http://127.0.0.1:4443`.

  Returns:
    Variable name -> value; see the module docstring for what each one does.
  """
  return {
      "STORAGE_EMULATOR_HOST": url,
      "TENSORSTORE_GCS_HTTP_URL": url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
      "FSSPEC_GCS_TOKEN": "anon",
      "NO_GCE_CHECK": "true",
      "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
      "EPATH_USE_TF": "false",
  }


@dataclasses.dataclass(frozen=True)
class Emulator:
  """A running emulator with one bucket.

  Attributes:
    url: base URL of the emulator's JSON API.
    bucket: name of the bucket it created.
    root: `gs://<bucket>`, the root to put test workdirs under.
    env: the environment variables set while it runs (module docstring).
    log_path: the emulator's log file (requests it could not serve show up
      there as "Method not implemented").
  """

  url: str
  bucket: str
  root: str
  env: dict[str, str]
  log_path: str

  def object_names(self, prefix: str = "") -> list[str]:
    """Lists the bucket's objects through the emulator's HTTP API.

    This asks the server directly, not gcsfs or epath, so a test can check
    that data really reached the bucket.

    Args:
      prefix: only names that start with it (no leading slash).

    Returns:
      The object names, sorted, without the `gs://<bucket>/` part.
    """
    query = urllib.parse.urlencode({"prefix": prefix})
    address = f"{self.url}/storage/v1/b/{self.bucket}/o?{query}"
    with urllib.request.urlopen(address, timeout=30) as response:
      listing = json.load(response)
    # The emulator answers in one page; a token would mean names are missing.
    assert "nextPageToken" not in listing, listing["nextPageToken"]
    return sorted(item["name"] for item in listing.get("items", []))


def _reset_client_caches() -> None:
  """Drops GCS clients that epath and fsspec cached before the env changed."""
  # Imported here and below, not at the top: the emulator's child process
  # needs none of them, and gcsfs reads its environment when first imported.
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import fsspec
  import gcsfs
  from etils.epath import backend as epath_backend
  from etils.epath import gpath as epath_gpath

  gcsfs.GCSFileSystem.clear_instance_cache()
  gcsfs.core.GCSFileSystem.clear_instance_cache()
  # epath keeps one fsspec filesystem per protocol and decides once whether
  # TensorFlow serves gs://; both must see the emulator's environment.
  epath_backend.fsspec_backend._get_filesystem.cache_clear()  # pylint: disable=protected-access
  epath_gpath._is_tf_installed.cache_clear()  # pylint: disable=protected-access
  # fsspec reads FSSPEC_* variables only when it is first imported.
  fsspec.config.conf.clear()
  fsspec.config.set_conf_files(fsspec.config.conf_dir, fsspec.config.conf)
  fsspec.config.set_conf_env(fsspec.config.conf)


@contextlib.contextmanager
def _environment(env: dict[str, str]):
  """Sets `env` in os.environ and restores the previous values on exit."""
  saved = {name: os.environ.get(name) for name in env}
  os.environ.update(env)
  try:
    yield
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@contextlib.contextmanager
def _core_gcsfs_registered():
  """Makes fsspec's `gs`/`gcs` the plain gcsfs class while inside.

  gcsfs picks its zonal/HNS subclass when it is first imported, from
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT; if it was imported before the emulator
  started, the subclass would still be registered and time out on gRPC.

  Yields:
    Nothing.
  """
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import fsspec
  import gcsfs

  saved = {p: fsspec.registry.get(p) for p in ("gs", "gcs")}
  for protocol in saved:
    fsspec.register_implementation(
        protocol, gcsfs.core.GCSFileSystem, clobber=True
    )
  try:
    yield
  finally:
    for protocol, cls in saved.items():
      if cls is not None:
        fsspec.register_implementation(protocol, cls, clobber=True)


def _start_child(bucket: str, log_file) -> tuple[subprocess.Popen, int]:
  """Starts the emulator process and returns it with its port."""
  child = subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), bucket],
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
      stderr=log_file,
      text=True,
  )
  ready, _, _ = select.select([child.stdout], [], [], _START_TIMEOUT_S)
  line = child.stdout.readline() if ready else ""  # '' also if it died.
  if not line.strip().isdigit():
    child.kill()
    child.wait(_STOP_TIMEOUT_S)
    log_file.seek(0)
    raise RuntimeError(
        f"GCS emulator did not start (printed {line!r}):\n{log_file.read()}"
    )
  return child, int(line)


@contextlib.contextmanager
def running(bucket: str | None = None):
  """Runs an emulator with one bucket and points the GCS clients at it.

  Args:
    bucket: bucket name; a fresh random one by default, so that clients
      cached in this process for an earlier emulator are never reused.

  Yields:
    An `Emulator`.
  """
  bucket = bucket or f"synthdistill-{secrets.token_hex(4)}"
  with tempfile.NamedTemporaryFile(
      "w+", prefix="gcs_emulator_", suffix=".log", delete=False
  ) as log_file:
    child, port = _start_child(bucket, log_file)
    url = f"http://127.0.0.1:{port}"
    emulator = Emulator(
        url=url,
        bucket=bucket,
        root=f"gs://{bucket}",
        env=emulator_env(url),
        log_path=log_file.name,
    )
    try:
      with _core_gcsfs_registered():
        try:
          with _environment(emulator.env):
            _reset_client_caches()
            yield emulator
        finally:
          # After the environment is restored: fsspec's config is re-read.
          _reset_client_caches()
    finally:
      child.stdin.close()  # The child serves until its stdin closes.
      try:
        child.wait(_STOP_TIMEOUT_S)
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait(_STOP_TIMEOUT_S)
      os.unlink(log_file.name)


@pytest.fixture(scope="session")
def gcs_emulator():
  """One emulator for the test session (see `running`).

  A test module takes it with `from tests import gcs_emulator as
  gcs_emulator_lib` and `gcs_emulator = gcs_emulator_lib.gcs_emulator`.

  Yields:
    An `Emulator`.
  """
  with running() as emulator:
    yield emulator


def _move_object(request, response, storage) -> None:
  """Serves `objects.move` (POST .../o/SRC/moveTo/o/DST) as copy + delete.

  gcsfs renames with `moveTo` first and falls back to copy + delete only after
  its retries of the emulator's 501 (about 30 s per rename).

  Args:
    request: the emulator's request (bucket_name, object_id, dest_object_id).
    response: the emulator's response.
    storage: the emulator's storage.
  """
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from gcp_storage_emulator.handlers import objects

  params = request.params
  params["dest_bucket_name"] = params["bucket_name"]
  objects.copy(request, response, storage)
  if response.status == http.HTTPStatus.OK:
    storage.delete_file(params["bucket_name"], params["object_id"])


def _download_with_generation(request, response, storage) -> None:
  """Serves a media download with the object's generation in its headers.

  GCS sends `x-goog-generation` with every object's bytes; tensorstore takes
  the generation of what it read from there and makes its next conditional
  write on it. Without the header, orbax's OCDBT writes fail now and then
  with "Malformed StorageGeneration".

  Args:
    request: the emulator's request (bucket_name, object_id).
    response: the emulator's response.
    storage: the emulator's storage.
  """
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from gcp_storage_emulator import exceptions
  from gcp_storage_emulator.handlers import objects

  try:
    obj = storage.get_file_obj(
        request.params["bucket_name"], request.params["object_id"]
    )
  except exceptions.NotFound:
    obj = None
  if obj is not None:
    response["x-goog-generation"] = obj["generation"]
    response["x-goog-metageneration"] = obj["metageneration"]
  _ORIGINAL_DOWNLOAD[0](request, response, storage)


# The emulator's own download handler, wrapped by _download_with_generation.
_ORIGINAL_DOWNLOAD = []


def _serve(bucket: str) -> None:
  """The child process: serve `bucket` until stdin closes."""
  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import logging

  from gcp_storage_emulator import server
  from gcp_storage_emulator.handlers import objects

  logging.basicConfig(level=logging.WARNING)
  # tensorstore opens many connections at once; the server takes them one by
  # one, so let them queue rather than be refused and retried.
  http.server.HTTPServer.request_queue_size = 128
  move_route = (
      r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)"
      r"/moveTo/o/(?P<dest_object_id>.*[^/]+)$"
  )
  server.HANDLERS = ((move_route, {"POST": _move_object}),) + server.HANDLERS
  # objects.get (`?alt=media`, what tensorstore reads) calls the module's
  # `download` by name, so replacing it there covers that route.
  _ORIGINAL_DOWNLOAD.append(objects.download)
  objects.download = _download_with_generation
  emulator = server.create_server(
      "127.0.0.1", 0, in_memory=True, default_bucket=bucket
  )
  emulator.start()
  print(emulator._api._httpd.server_address[1], flush=True)  # pylint: disable=protected-access
  sys.stdin.read()
  emulator.stop()


if __name__ == "__main__":
  _serve(sys.argv[1])
