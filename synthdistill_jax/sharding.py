"""The device mesh, sharding rules and host-local -> global arrays.

One 'data' axis spans every device of every host. The global batch is split
along it; frozen networks are replicated; the student (and its optimiser
state) is replicated or, by config, sharded ZeRO-3 style: each array's largest
axis that the device count divides is split over 'data' and XLA gathers it
where it is used.
"""

from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

DATA_AXIS = "data"
STUDENT_SHARDINGS = ("replicated", "sharded")


def create_mesh(
    num_devices: int | None = None, devices=None
) -> jax.sharding.Mesh:
  """A 1-D mesh over the first `num_devices` devices (default: all of them).

  Args:
    num_devices: how many devices to use; `None` or 0 for all (every host).
    devices: the devices to choose from (default `jax.devices()`), e.g. a
      TPU topology's devices for ahead-of-time compilation.

  Returns:
    A `Mesh` with the single axis 'data'.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = num_devices or len(devices)
  if n > len(devices):
    raise ValueError(
        f"mesh.num_devices={n} but only {len(devices)} devices; set"
        f" --config.mesh.num_devices to at most {len(devices)} (0 = all)"
    )
  # Auto axes: the step is written in the global view and XLA partitions it
  # (sharding constraints, not explicit-sharding types).
  auto = (jax.sharding.AxisType.Auto,)
  if n == len(devices):
    return jax.make_mesh((n,), (DATA_AXIS,), axis_types=auto, devices=devices)
  return jax.sharding.Mesh(
      np.asarray(devices[:n]), (DATA_AXIS,), axis_types=auto
  )


def batch_sharding(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Arrays whose leading axis is the global batch."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """A full copy on every device."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def shard_largest_axis(mesh: jax.sharding.Mesh, shape) -> Any:
  """Splits the largest axis that the device count divides (else replicates).

  Args:
    mesh: the mesh.
    shape: the array's shape.

  Returns:
    A `NamedSharding`.
  """
  n = mesh.shape[DATA_AXIS]
  axes = [a for a in range(len(shape)) if shape[a] % n == 0 and shape[a] >= n]
  if n == 1 or not axes:
    return replicated(mesh)
  axis = max(axes, key=lambda a: shape[a])
  spec = [None] * len(shape)
  spec[axis] = DATA_AXIS
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))


def student_shardings(mesh: jax.sharding.Mesh, tree: Any, mode: str) -> Any:
  """Shardings of a student-state tree (shapes) by the configured mode.

  Args:
    mesh: the mesh.
    tree: a pytree of arrays or `ShapeDtypeStruct`s.
    mode: 'replicated' or 'sharded'.

  Returns:
    A matching pytree of `NamedSharding`s.
  """
  if mode not in STUDENT_SHARDINGS:
    raise ValueError(
        f"unknown student sharding {mode!r}; known: {STUDENT_SHARDINGS}"
    )
  if mode == "replicated":
    return jax.tree.map(lambda _: replicated(mesh), tree)
  return jax.tree.map(lambda x: shard_largest_axis(mesh, x.shape), tree)


def put_replicated(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """Host numpy tree (identical on every host) -> replicated global arrays."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_callback(
          np.shape(x), sharding, lambda idx: np.asarray(x)[idx]
      ),
      tree,
  )


def put_process_local_batch(mesh: jax.sharding.Mesh, tree: Any) -> Any:
  """This host's slice of a global batch -> global batch-sharded arrays.

  Args:
    mesh: the mesh.
    tree: numpy arrays holding this process's rows (global batch divided by
      the process count, in process order).

  Returns:
    Global arrays sharded on 'data'.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), tree
  )


def to_host(tree: Any) -> Any:
  """Fully-replicated or addressable global arrays -> host numpy.

  Args:
    tree: global arrays; replicated ones are read from a local copy.

  Returns:
    The same tree of numpy arrays.
  """

  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)


def wait_for_all_processes(name: str, timeout_s: float = 3600.0) -> None:
  """A barrier over every process, through the coordination service.

  Unlike a collective (`multihost_utils.sync_global_devices`, which on CPU
  hosts gives up after gloo's 30 s), it waits as long as `timeout_s`: use it
  where processes may drift apart by more (compiling at different speeds,
  process 0 writing reports), so that the next collective starts together.

  Args:
    name: a name unique to this point of the run (e.g. with the step).
    timeout_s: how long to wait for the slowest process.
  """
  if jax.process_count() == 1:
    return
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  client = distributed.global_state.client
  if client is None:  # Multi-process without jax.distributed: a collective.
    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, int(timeout_s * 1000))
