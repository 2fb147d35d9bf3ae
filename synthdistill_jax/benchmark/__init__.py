"""Throughput benchmark (`python -m synthdistill_jax.benchmark`): per-stage and whole-iteration speed, memory and MFU.

For one config it times, after warm-up and with `block_until_ready`, each stage
of a SynthDistill iteration alone (mapping + synthesis, face crop, teacher
forward, student forward + backward + update) and the whole two-update
iteration; it reports images/s (global and per device), compile times, peak
memory, FLOPs per image from XLA's cost analysis and the model-FLOPs
utilisation (MFU) against a matmul peak measured in the same run (and against
the datasheet figure on known accelerators). Output: a table on stdout and a
JSON file.

  python -m synthdistill_jax.benchmark --config=configs/demo.py
  python -m synthdistill_jax.benchmark \
      --config=configs/synthdistill.py:tinyfar_a --batch_size=8 \
      --random_weights --output=bench/tinyfar_a.json
  python -m synthdistill_jax.benchmark --config=configs/demo.py \
      --compare=configs/demo.py --compare.compute_dtype=bfloat16

Checkpoints of the paper networks cannot always be at hand; with
`--random_weights` (or automatically when a checkpoint is missing) the frozen
networks get random weights of the right shapes: FLOPs and speed do not depend
on the values. The JSON and the table say so.
"""

#
# Rooms: `timing` (the harness: compile, warm up, time, FLOPs, memory,
# distinct kernels, datasheet peaks, the profiler's libtpu check), `stages`
# (the stages of an iteration, built from the trainer's own
# `experiment.create`), `report` (table, comparison, config difference) and
# `__main__` (flags and the JSON file).
