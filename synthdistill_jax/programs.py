"""The iteration as one program, or on CPU as five compiled separately.

`distill.iteration` is one jitted program everywhere but on XLA:CPU, where
`SplitIteration` runs its pieces as separate executables with the same
shardings and the same results:

  begin (key, latents) -> render+teacher -> student step -> next latents
  -> render+teacher -> student step -> finish (count, merge metrics)

Why on CPU:

* XLA:CPU's YNNPACK fusions (on by default in jaxlib 0.10) suit the
  student's small matmuls and reductions but slow the generator's and the
  teacher's large convolutions: the render+teacher program is compiled
  without them (`RENDER_CPU_OPTIONS`: generator 3.9 -> 5.5 img/s, teacher
  11.8 -> 15.7 img/s on a 2-core AVX-512 host), which compiler options can
  only do per executable.
* The fused program holds the student step twice; split, each piece is
  compiled once, and the pieces compile in parallel threads.
* The student step is compiled at LLVM's -O1 (`STEP_CPU_OPTIONS`): about
  a tenth less compile for the same step time.

On TPU and GPU the iteration stays one program (`split_iteration='auto'`):
there XLA overlaps and fuses across the pieces and a dispatch per piece
would cost more than it saves; the AOT compile for TPU slices is unchanged.
"""

import concurrent.futures
import functools
from typing import Any

import jax
import numpy as np

from synthdistill_jax import distill
from synthdistill_jax import errors
from synthdistill_jax import sharding

SPLIT_MODES = ("auto", "on", "off")
SPLIT_MODES_NOTE = (
    " ('auto': separate programs on CPU, one program on TPU and GPU)"
)

# XLA:CPU options of the render+teacher executable: no YNNPACK fusions, so
# that convolutions take XLA's own (Eigen) path.
RENDER_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}
# XLA:CPU options of the student step: LLVM's -O1 pipeline for its ~460
# distinct elementwise kernels, whose speed is memory-bound either way
# (TinyFaR-A, 2-core AVX2 host, four alternating pairs of processes:
# compile 10.75 -> 9.65 s mean, 18.2 -> 15.9 CPU-s; step 241.8 vs 240.7 ms
# median with both compiled in one process and called in turn; parameters
# equal to 5e-10; docs/performance.md, 2026-12-07).
STEP_CPU_OPTIONS = {"xla_backend_optimization_level": 1}

_INT32_MAX = np.iinfo(np.int32).max


def use_split(mode: str, mesh: jax.sharding.Mesh, sampler: str) -> bool:
  """Whether the iteration runs as separate executables.

  Args:
    mode: `split_iteration`, one of `SPLIT_MODES` ('auto': on CPU only).
    mesh: the device mesh (its platform decides 'auto').
    sampler: the sampler; the static one has no generator to split off.

  Returns:
    True for `SplitIteration`, False for one jitted `distill.iteration`.

  Raises:
    ValueError: one line naming `split_iteration` for an unknown mode.
  """
  errors.check_choice(mode, SPLIT_MODES, "split_iteration", SPLIT_MODES_NOTE)
  if sampler == "static" or mode == "off":
    return False
  return mode == "on" or mesh.devices.flat[0].platform == "cpu"


def offset_inputs(spec: distill.DistillSpec, mesh, params) -> tuple | None:
  """The `offsets` argument of `distill.train_step` as program inputs.

  Replicated int32 scalars, one per parameter leaf, where the raveled
  update is taken from (`distill.raveled_offsets`); None when the spec's
  optimiser is not raveled (`DistillSpec.flat_tx`).

  Args:
    spec: the program spec.
    mesh: the device mesh.
    params: the student parameters (arrays or shapes).

  Returns:
    A tuple of arrays, or None (then `train_step` uses constants).
  """
  if spec.flat_tx is None:
    return None
  if sum(leaf.size for leaf in jax.tree.leaves(params)) > _INT32_MAX:
    # Beyond int32 (JAX's default index width): constant offsets instead.
    return None
  rep = sharding.replicated(mesh)
  # As `_updates`: no `device_put`, which would compare the hosts' values.
  return tuple(
      jax.make_array_from_callback((), rep, lambda _, o=o: np.int32(o))
      for o in distill.raveled_offsets(params)
  )


class SplitIteration:
  """`distill.iteration` as separately compiled pieces (see the module doc).

  Called like the jitted iteration, `(state, gen_vars, teacher_vars,
  static_batches) -> (state, metrics)`, with the state donated; `lower`
  and `compile` mirror `jax.jit`'s ahead-of-time API for the benchmark.

  Attributes:
    programs: name -> `(jitted, calls per iteration)`.
    render_options: the XLA options of the render+teacher piece (None:
      the backend's defaults).
    step_options: the XLA options of the student step (None: the
      backend's defaults).
  """

  def __init__(self, spec: distill.DistillSpec, mesh, state_shardings):
    rep = sharding.replicated(mesh)
    batch = sharding.batch_sharding(mesh)
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    self.render_options = RENDER_CPU_OPTIONS if on_cpu else None
    self.step_options = STEP_CPU_OPTIONS if on_cpu else None
    # Not `device_put`: with several processes it checks that every host
    # passes the same value, a CPU collective that gives up after 30 s while
    # the hosts are still apart (building the networks at different speeds).
    self._updates = [
        jax.make_array_from_callback((), rep, lambda _, k=k: np.int32(k))
        for k in range(distill.UPDATES_PER_ITERATION)
    ]
    part = functools.partial
    self.programs = {
        "begin": (
            jax.jit(
                part(distill.begin_iteration, spec),
                in_shardings=(state_shardings, rep),
                out_shardings=(rep, batch),
            ),
            1,
        ),
        "render": (
            jax.jit(
                part(distill.render_and_embed, spec),
                in_shardings=(rep, rep, batch, rep, rep),
                out_shardings=(batch, batch),
            ),
            distill.UPDATES_PER_ITERATION,
        ),
        "step": (
            jax.jit(
                part(distill.train_step, spec),
                in_shardings=(state_shardings, batch, batch, rep, rep),
                out_shardings=(state_shardings, rep, batch),
                donate_argnums=0,
            ),
            distill.UPDATES_PER_ITERATION,
        ),
        "next": (
            jax.jit(
                part(distill.next_latents, spec),
                in_shardings=(rep, rep, batch, batch, batch),
                out_shardings=batch,
            ),
            1,
        ),
        "finish": (
            jax.jit(
                distill.finish_iteration,
                in_shardings=(state_shardings, rep, rep),
                out_shardings=(state_shardings, rep),
                donate_argnums=0,
            ),
            1,
        ),
    }
    self._spec, self._mesh = spec, mesh
    self._offsets = None
    self._compiled = None

  def _run(self, run: dict, state, gen_vars, teacher_vars):
    """The iteration with `run[name]` as the callable of each piece."""
    k0, k1 = self._updates
    if self._offsets is None:
      self._offsets = offset_inputs(self._spec, self._mesh, state.params)
    offsets = self._offsets
    key, w = run["begin"](state, gen_vars)
    x, t = run["render"](gen_vars, teacher_vars, w, key, k0)
    state, first, s = run["step"](state, x, t, k0, offsets)
    w = run["next"](gen_vars, key, w, s, t)
    x, t = run["render"](gen_vars, teacher_vars, w, key, k1)
    state, second, _ = run["step"](state, x, t, k1, offsets)
    return run["finish"](state, first, second)

  def _abstract_args(self, state, gen_vars, teacher_vars) -> dict:
    """Each piece's arguments as shapes, traced through `jax.eval_shape`."""
    args = {}

    def record(name):
      jitted = self.programs[name][0]

      def call(*a):
        args.setdefault(name, a)
        return jax.eval_shape(jitted, *a)

      return call

    jax.eval_shape(
        lambda *a: self._run({n: record(n) for n in self.programs}, *a),
        state,
        gen_vars,
        teacher_vars,
    )
    return args

  def lower(self, state, gen_vars, teacher_vars, static_batches=None):
    """Lowers every piece for these arguments (arrays or shapes)."""
    del static_batches  # The split iteration renders its own faces.
    args = self._abstract_args(state, gen_vars, teacher_vars)
    options = {"render": self.render_options, "step": self.step_options}
    return LoweredSplit(
        {
            name: (
                _Lowered(jitted.lower(*args[name]), options.get(name)),
                calls,
            )
            for name, (jitted, calls) in self.programs.items()
        },
        self,
    )

  def __call__(self, state, gen_vars, teacher_vars, static_batches=None):
    if self._compiled is None:
      # Compiles the pieces in parallel threads (XLA releases the GIL).
      self._compiled = self.lower(state, gen_vars, teacher_vars).compile()
    return self._compiled(state, gen_vars, teacher_vars, static_batches)


class WithOptions:
  """A jitted function whose ahead-of-time compile passes XLA options.

  (`jax.jit(..., compiler_options=...)` does not reach
  `.lower(...).compile()` in jax 0.10; `compile(compiler_options=...)`
  does.) Used by the benchmark to compile stages as the trainer does.
  """

  def __init__(self, jitted, options: dict | None):
    self.jitted = jitted
    self.options = options

  def lower(self, *args):
    return _Lowered(self.jitted.lower(*args), self.options)


class _Lowered:
  """`jax.stages.Lowered` whose `compile()` passes fixed XLA options."""

  def __init__(self, lowered, options: dict | None):
    self._lowered = lowered
    self.options = options

  def compile(self):
    return self._lowered.compile(self.options)

  def as_text(self) -> str:
    return self._lowered.as_text()


class LoweredSplit:
  """The lowered pieces; `compile()` compiles them in parallel threads."""

  def __init__(self, lowered: dict, owner: SplitIteration):
    self.lowered = lowered
    self._owner = owner

  def as_text(self) -> str:
    return "\n".join(low.as_text() for low, _ in self.lowered.values())

  def compile(self) -> "CompiledSplit":
    with concurrent.futures.ThreadPoolExecutor(len(self.lowered)) as pool:
      futures = {
          name: pool.submit(low.compile)
          for name, (low, _) in self.lowered.items()
      }
      compiled = {
          name: (futures[name].result(), calls)
          for name, (_, calls) in self.lowered.items()
      }
    return CompiledSplit(compiled, self._owner)


class CompiledSplit:
  """The compiled pieces, called as the iteration; analyses summed."""

  def __init__(self, compiled: dict, owner: SplitIteration):
    self.compiled = compiled
    self._owner = owner
    self.output_shardings = compiled["finish"][0].output_shardings

  def __call__(self, state, gen_vars, teacher_vars, static_batches=None):
    del static_batches
    run = {name: c for name, (c, _) in self.compiled.items()}
    return self._owner._run(run, state, gen_vars, teacher_vars)

  def cost_analysis(self) -> dict:
    """FLOPs of one iteration: each piece's times its calls."""
    flops = 0.0
    for c, calls in self.compiled.values():
      analysis = c.cost_analysis()
      if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else {}
      flops += calls * max(float((analysis or {}).get("flops", 0.0)), 0.0)
    return {"flops": flops}

  def memory_analysis(self):
    """The piece with the most temporary memory (they run one at a time)."""
    stats = [c.memory_analysis() for c, _ in self.compiled.values()]
    stats = [s[0] if isinstance(s, (list, tuple)) else s for s in stats]
    stats = [s for s in stats if s is not None]
    if not stats:
      return None
    return max(stats, key=lambda s: getattr(s, "temp_size_in_bytes", 0))

  def as_text(self) -> str:
    return "\n".join(c.as_text() for c, _ in self.compiled.values())
