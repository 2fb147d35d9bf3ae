"""The SynthDistill iteration as pure functions (one jitted program).

Otroshi Shahreza, George, Marcel, "SynthDistill: Face Recognition with
Knowledge Distillation from Synthetic Data", IJCB 2023
(https://arxiv.org/abs/2308.14852); reference `train.py` of
`otroshi/synthdistill`.

One iteration takes two optimiser updates:

* `resample` (the paper's method): z -> w -> faces -> update 1 on them; then
  `w' = w + coef * (cos(s, t) + 1) / 2 * eps` with `s` the student output
  from before update 1, faces of w' with fresh pixel noise -> update 2.
* `dynamic`: the same without feedback: update 2 uses a fresh batch of z.
* `static`: both updates on batches read from an offline set (faces stored as
  uint8 next to their teacher embeddings), so no generator or teacher runs.

The student runs in train mode (batch statistics) for both updates, the
teacher and the generator in eval mode, as in the reference. Randomness is a
pure function of (root key, iteration, global sample index), so the same seed
gives the same samples whatever the device count.
"""

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from synthdistill_jax import faces

LOSSES = ("mse", "cosine", "mse+cosine")
SAMPLERS = ("static", "dynamic", "resample")
UPDATES_PER_ITERATION = 2

# Sub-streams of an update's key (fold_in tags): never reuse a key.
_Z, _NOISE, _EPS, _NUM_TAGS = range(4)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (and is checkpointed).

  Attributes:
    step: iterations done (each is `UPDATES_PER_ITERATION` updates).
    params: student parameters (float32).
    batch_stats: student BatchNorm running statistics.
    opt_state: optax state.
    rng: root PRNG key data (uint32[2]); iteration keys are folded from it.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array


@dataclasses.dataclass(frozen=True)
class DistillSpec:
  """The static part of the program: modules and hyper-parameters.

  Attributes:
    generator: StyleGAN2 `Generator` module (None for the static sampler).
    teacher: teacher face network (None for the static sampler).
    student: student face network.
    tx: optax transformation of the student parameters.
    schedule: learning rate as a function of the update count.
    batch_size: global batch size.
    sampler: one of `SAMPLERS`.
    loss: one of `LOSSES`.
    resampling_coef: `coef` of the re-sampling rule.
    truncation_psi: truncation of the mapping (1.0 in the paper).
    noise_mode: synthesis noise ('random' in the paper, 'const', 'none').
    batch_sharding: sharding of batch-leading arrays (None: no constraint).
    concatenated_norms: compute the step's norm metrics over one
      concatenated vector (`global_norm`); only for a replicated student.
    flat_tx: set when `tx` is `optax.flatten(flat_tx)`: `train_step` then
      runs `flat_tx` on the raveled vector itself and adds each leaf's part
      of the update at an offset the caller may pass as a program input
      (`raveled_offsets`), with the same optimiser state and numbers.
  """

  generator: nn.Module | None
  teacher: nn.Module | None
  student: nn.Module
  tx: optax.GradientTransformation
  schedule: Callable[[jax.Array], jax.Array]
  batch_size: int
  sampler: str = "resample"
  loss: str = "mse"
  resampling_coef: float = 1.0
  truncation_psi: float = 1.0
  noise_mode: str = "random"
  batch_sharding: Any = None
  concatenated_norms: bool = False
  flat_tx: optax.GradientTransformation | None = None


def _constrain(spec: DistillSpec, x: jax.Array) -> jax.Array:
  if spec.batch_sharding is None:
    return x
  return jax.lax.with_sharding_constraint(x, spec.batch_sharding)


def sample_latents(
    spec: DistillSpec, gen_vars: Any, key: jax.Array, num: int | None = None
) -> jax.Array:
  """Draws z per global sample index and maps it to w.

  Args:
    spec: the program spec (generator, psi).
    gen_vars: generator variables.
    key: key of this batch; sample i uses `fold_in(key, i)`.
    num: batch size (default `spec.batch_size`).

  Returns:
    `[B, w_dim]` float32 latents (row 0 of the mapped ws; with no truncation
    cutoff all rows are equal).
  """
  gen = spec.generator
  index = _constrain(spec, jnp.arange(num or spec.batch_size))
  z = jax.vmap(
      lambda i: jax.random.normal(jax.random.fold_in(key, i), (gen.z_dim,))
  )(index)
  # Unconditional generators only (checked at start): no label.
  c = None
  ws = gen.apply(
      gen_vars, z, c, truncation_psi=spec.truncation_psi, method="mapping"
  )
  return _constrain(spec, ws[:, 0].astype(jnp.float32))


def render_faces(
    spec: DistillSpec, gen_vars: Any, w: jax.Array, key: jax.Array
) -> jax.Array:
  """w -> synthesis (fresh noise from `key`) -> aligned 112x112 faces.

  Args:
    spec: the program spec (generator, noise mode).
    gen_vars: generator variables.
    w: `[B, w_dim]` latents, broadcast to every one of the num_ws rows.
    key: pixel-noise key of this batch.

  Returns:
    `[B, 112, 112, 3]` float32 faces in [0, 1].
  """
  gen = spec.generator
  ws = jnp.broadcast_to(w[:, None, :], (w.shape[0], gen.num_ws, w.shape[1]))
  img = gen.apply(
      gen_vars,
      ws,
      noise_mode=spec.noise_mode,
      rngs={"noise": key},
      method="synthesis",
  )
  return _constrain(spec, faces.generator_to_faces(img))


def embed_teacher(spec: DistillSpec, teacher_vars: Any, x: jax.Array):
  """Frozen teacher embeddings of [0, 1] faces (eval mode, no gradient)."""
  t = spec.teacher.apply(
      teacher_vars, faces.normalise_for_teacher(x), train=False
  )
  return jax.lax.stop_gradient(t.astype(jnp.float32))


def cosine_similarity(s: jax.Array, t: jax.Array) -> jax.Array:
  """Per-row cosine, as `torch.nn.CosineSimilarity()` (eps 1e-8 per norm)."""
  norm_s = jnp.maximum(jnp.linalg.norm(s, axis=-1), 1e-8)
  norm_t = jnp.maximum(jnp.linalg.norm(t, axis=-1), 1e-8)
  return jnp.sum(s * t, axis=-1) / (norm_s * norm_t)


def distill_loss(s: jax.Array, t: jax.Array, kind: str = "mse"):
  """The distillation loss between student and teacher embeddings.

  Args:
    s: `[B, D]` student embeddings.
    t: `[B, D]` teacher embeddings.
    kind: 'mse' (mean over B x D, the paper), 'cosine' (1 - mean cosine) or
      'mse+cosine' (their sum).

  Returns:
    `(loss, {'mse': ..., 'cosine': ...})`.
  """
  mse = jnp.mean(jnp.square(s - t))
  cos = jnp.mean(cosine_similarity(s, t))
  terms = {"mse": mse, "cosine": 1.0 - cos, "mse+cosine": mse + 1.0 - cos}
  if kind not in terms:
    raise ValueError(f"unknown loss {kind!r}; known: {', '.join(LOSSES)}")
  return terms[kind], {"mse": mse, "cosine": cos}


def resample_latents(
    w: jax.Array, s: jax.Array, t: jax.Array, eps: jax.Array, coef: float
) -> jax.Array:
  """The feedback rule: `w + coef * (cos(s, t) + 1) / 2 * eps` per sample.

  Hard samples (low cosine) move little, easy ones up to `coef`.

  Args:
    w: `[B, w_dim]` latents of the batch just trained on.
    s: `[B, D]` student embeddings from before the update.
    t: `[B, D]` teacher embeddings.
    eps: `[B, w_dim]` standard normal noise.
    coef: the re-sampling coefficient.

  Returns:
    `[B, w_dim]` new latents.
  """
  c = (cosine_similarity(s, t) + 1.0) / 2.0
  return w + coef * jax.lax.stop_gradient(c)[:, None] * eps


def apply_student(spec: DistillSpec, params, batch_stats, x, *, train: bool):
  """Student embeddings of [0, 1] faces; train mode also returns new stats."""
  variables = {"params": params, "batch_stats": batch_stats}
  x = faces.normalise_for_student(x)
  if not train:
    return spec.student.apply(variables, x, train=False).astype(jnp.float32)
  s, updates = spec.student.apply(
      variables, x, train=True, mutable=["batch_stats"]
  )
  return s.astype(jnp.float32), updates["batch_stats"]


def global_norm(tree: Any, concatenate: bool) -> jax.Array:
  """The L2 norm of all the leaves of `tree`, as `optax.tree.norm`.

  With `concatenate`, the leaves are raveled into one vector that is reduced
  once. Leaf by leaf, XLA:CPU emits two kernels per leaf (a partial and a
  final sum): for TinyFaR-A's 250 leaves and the step's three norms about
  1,500 kernels, a sixth of the student step's compile time. Concatenating
  sharded leaves would gather them, hence the flag.

  Args:
    tree: arrays (float32).
    concatenate: reduce one concatenated vector instead of leaf by leaf.

  Returns:
    A float32 scalar.
  """
  if not concatenate:
    return optax.tree.norm(tree)
  flat = jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])
  return jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))


def train_step(
    spec: DistillSpec,
    state: TrainState,
    x: jax.Array,
    t: jax.Array,
    k: int,
    offsets: tuple | None = None,
):
  """One optimiser update on faces `x` with teacher targets `t`.

  Args:
    spec: the program spec.
    state: current state.
    x: `[B, 112, 112, 3]` faces in [0, 1].
    t: `[B, D]` teacher embeddings.
    k: index of this update within the iteration (for the learning rate).
    offsets: with `spec.flat_tx`, the parameter leaves' offsets in the
      raveled vector as int32 scalars, one program input each
      (`raveled_offsets`); None: the same offsets as constants.

  Returns:
    `(new_state, metrics, s)` with `s` the student output before the update.
  """

  def loss_fn(params):
    s, stats = apply_student(spec, params, state.batch_stats, x, train=True)
    loss, parts = distill_loss(s, t, spec.loss)
    return loss, (s, stats, parts)

  (loss, (s, stats, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params
  )
  if spec.flat_tx is None:
    updates, opt_state = spec.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    update_norm = global_norm(updates, spec.concatenated_norms)
  else:
    params, opt_state, update_norm = _raveled_update(
        spec.flat_tx, state, grads, offsets
    )
  count = state.step * UPDATES_PER_ITERATION + k
  metrics = dict(
      parts,
      loss=loss,
      grad_norm=global_norm(grads, spec.concatenated_norms),
      update_norm=update_norm,
      param_norm=global_norm(params, spec.concatenated_norms),
      learning_rate=spec.schedule(count),
  )
  new_state = state.replace(
      params=params, batch_stats=stats, opt_state=opt_state
  )
  return new_state, metrics, s


def raveled_offsets(params: Any) -> tuple[int, ...]:
  """Where each leaf of `params` starts in the raveled vector.

  The order is `jax.tree.leaves` (that of `optax.flatten`, whose optimiser
  state `train_step` keeps with `spec.flat_tx`).

  Args:
    params: arrays or `ShapeDtypeStruct`s.

  Returns:
    One offset per leaf.
  """
  offsets, start = [], 0
  for leaf in jax.tree.leaves(params):
    offsets.append(start)
    start += leaf.size
  return tuple(offsets)


def _raveled_update(flat_tx, state: TrainState, grads, offsets):
  """`optax.flatten(flat_tx)`'s update and `optax.apply_updates`, fused.

  Unravelling the update slices it at one constant offset per leaf, and
  XLA:CPU compiles each such slice-and-add as a kernel of its own (252 for
  TinyFaR-A, about 2 s of the step's compile). With the offsets as program
  inputs, equal-shaped leaves share one kernel (69 for TinyFaR-A). The
  update's norm is taken on the raveled vector.

  Returns:
    `(params, opt_state, update_norm)`.
  """

  def ravel(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

  leaves, treedef = jax.tree.flatten(state.params)
  # The raveled parameters are what `optax.flatten` passes; Adam ignores
  # them and XLA drops the concatenation.
  flat, opt_state = flat_tx.update(
      ravel(grads), state.opt_state, ravel(state.params)
  )

  def part(o, size):
    if offsets is None:
      return jax.lax.slice(flat, (o,), (o + size,))
    # The offsets are never negative: without the wrap-around check, three
    # traced equations less per leaf (756 for TinyFaR-A).
    return jax.lax.dynamic_slice(
        flat, (o,), (size,), allow_negative_indices=False
    )

  new = [
      (p + part(o, p.size).reshape(p.shape)).astype(p.dtype)
      for p, o in zip(
          leaves, offsets or raveled_offsets(state.params), strict=True
      )
  ]
  norm = jnp.sqrt(jnp.sum(jnp.square(flat.astype(jnp.float32))))
  return jax.tree.unflatten(treedef, new), opt_state, norm


def _merge_metrics(first: dict, second: dict) -> dict:
  """Means of both updates for the losses; norms of the second update."""
  out = dict(second)
  for name in ("loss", "mse", "cosine"):
    out[name] = (first[name] + second[name]) / 2.0
  out["loss_first"] = first["loss"]
  out["loss_second"] = second["loss"]
  return out


def _key(key: jax.Array, update: jax.Array, tag: int) -> jax.Array:
  """The key of stream `tag` of update `update` (0 or 1) of an iteration."""
  return jax.random.fold_in(key, update * _NUM_TAGS + tag)


def _static_iteration(spec, state, static_batches):
  """Both updates on batches read from the offline set."""
  (f1, t1), (f2, t2) = static_batches
  x1, x2 = (f.astype(jnp.float32) / 255.0 for f in (f1, f2))
  state, m1, _ = train_step(spec, state, x1, t1, 0)
  state, m2, _ = train_step(spec, state, x2, t2, 1)
  return state.replace(step=state.step + 1), _merge_metrics(m1, m2)


def begin_iteration(spec: DistillSpec, state: TrainState, gen_vars: Any):
  """The iteration's key and the latents of its first update.

  Args:
    spec: the program spec.
    state: current state.
    gen_vars: generator variables.

  Returns:
    `(key, w)`: the iteration key (every other stream is folded from it) and
    `[B, w_dim]` latents.
  """
  key = jax.random.fold_in(state.rng, state.step)
  return key, sample_latents(spec, gen_vars, _key(key, 0, _Z))


def render_and_embed(
    spec: DistillSpec,
    gen_vars: Any,
    teacher_vars: Any,
    w: jax.Array,
    key: jax.Array,
    update: jax.Array | int,
):
  """Faces of `w` with the pixel noise of `update`, and their teacher targets.

  Args:
    spec: the program spec.
    gen_vars: generator variables.
    teacher_vars: teacher variables.
    w: `[B, w_dim]` latents.
    key: the iteration key (`begin_iteration`).
    update: 0 or 1, the update within the iteration (may be traced).

  Returns:
    `(x, t)`: `[B, 112, 112, 3]` faces in [0, 1] and `[B, D]` embeddings.
  """
  x = render_faces(spec, gen_vars, w, _key(key, update, _NOISE))
  return x, embed_teacher(spec, teacher_vars, x)


def next_latents(
    spec: DistillSpec,
    gen_vars: Any,
    key: jax.Array,
    w: jax.Array,
    s: jax.Array,
    t: jax.Array,
):
  """The second update's latents: re-sampled from `w` or fresh (`dynamic`).

  Args:
    spec: the program spec.
    gen_vars: generator variables.
    key: the iteration key.
    w: the first update's latents.
    s: student embeddings of the first batch from before the first update.
    t: teacher embeddings of the first batch.

  Returns:
    `[B, w_dim]` latents.
  """
  if spec.sampler == "resample":
    eps = jax.random.normal(_key(key, 1, _EPS), w.shape, w.dtype)
    return resample_latents(
        w, s, t, _constrain(spec, eps), spec.resampling_coef
    )
  return sample_latents(spec, gen_vars, _key(key, 1, _Z))


def finish_iteration(state: TrainState, first: dict, second: dict):
  """Counts the iteration and merges the metrics of its two updates."""
  return state.replace(step=state.step + 1), _merge_metrics(first, second)


def iteration(
    spec: DistillSpec,
    state: TrainState,
    gen_vars: Any,
    teacher_vars: Any,
    static_batches: tuple | None = None,
):
  """One SynthDistill iteration: two updates (see the module docstring).

  Update 0 draws fresh latents; update 1 draws fresh ones too (`dynamic`)
  or re-samples update 0's (`resample`), with `s` from before update 0. The
  pieces (`begin_iteration`, `render_and_embed`, `train_step`,
  `next_latents`, `finish_iteration`) are also compiled one by one on CPU
  (`synthdistill_jax.programs`), with the same results.

  Args:
    spec: the program spec.
    state: current state (donated by the caller's jit).
    gen_vars: frozen generator variables (unused by the static sampler).
    teacher_vars: frozen teacher variables (unused by the static sampler).
    static_batches: for the static sampler, two `(faces_uint8, teacher)`
      pairs of global arrays.

  Returns:
    `(new_state, metrics)`; metrics are device scalars.
  """
  if spec.sampler == "static":
    return _static_iteration(spec, state, static_batches)
  # The two updates are written out (XLA:CPU runs convolutions inside a
  # while loop about 10x slower: 13.6 s vs 1.4 s per demo iteration), so
  # each computes only the latents it uses.
  key, w = begin_iteration(spec, state, gen_vars)
  x, t = render_and_embed(spec, gen_vars, teacher_vars, w, key, 0)
  state, first, s = train_step(spec, state, x, t, 0)
  w = next_latents(spec, gen_vars, key, w, s, t)
  x, t = render_and_embed(spec, gen_vars, teacher_vars, w, key, 1)
  state, second, _ = train_step(spec, state, x, t, 1)
  return finish_iteration(state, first, second)


def evaluate_batch(
    spec: DistillSpec,
    state: TrainState,
    gen_vars: Any,
    teacher_vars: Any,
    key: jax.Array,
):
  """Sums over one held-out batch: the student in eval mode vs the teacher.

  Args:
    spec: the program spec.
    state: current state.
    gen_vars: generator variables.
    teacher_vars: teacher variables.
    key: the batch's fixed key (same faces at every evaluation).

  Returns:
    dict of sums: `sse`, `cos`, `count`, per-dim `t_sum` and `t_sq_sum` (for
    R^2 against the teacher's per-dim mean).
  """
  w = sample_latents(spec, gen_vars, jax.random.fold_in(key, _Z))
  x = render_faces(spec, gen_vars, w, jax.random.fold_in(key, _NOISE))
  t = embed_teacher(spec, teacher_vars, x)
  s = apply_student(spec, state.params, state.batch_stats, x, train=False)
  return {
      "sse": jnp.sum(jnp.square(s - t)),
      "cos": jnp.sum(cosine_similarity(s, t)),
      "count": jnp.asarray(s.shape[0], jnp.float32),
      "t_sum": jnp.sum(t, axis=0),
      "t_sq_sum": jnp.sum(jnp.square(t), axis=0),
  }
