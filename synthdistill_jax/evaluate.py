r"""Face-recognition evaluation: verification bins, IJB-B/C, reports, CLI.

Any face model folder works: a trained student, a converted teacher, or any
converted checkpoint (see `synthdistill_jax.models.load`); a PyTorch `.pth`
with `--arch` is converted on the fly (needs the `convert` extra).

  python -m synthdistill_jax.evaluate --model DIR \
      --bins lfw.bin,cfp_fp.bin,agedb_30.bin [--output DIR/eval]
  python -m synthdistill_jax.evaluate --workdir WORKDIR --bins ...   # WORKDIR/student
  python -m synthdistill_jax.evaluate --model DIR --ijb_meta_dir IJBC/meta \
      --ijb_image_dir IJBC/loose_crop --ijb_name ijbc

Writes `report.md`, `report.json`, `roc_<benchmark>.png` and, for IJB, the
per-pair scores `scores_<benchmark>.npy`. Every input is validated before
the model is loaded; a bad input (a flag, a missing, hostile or malformed
file, a model whose arrays do not match its `model.json`) prints one line
naming it and exits with status 2, and so do NaN/Inf embeddings (no
accuracy is reported for them). Nothing in a `.pth`/`.bin` given to it is
ever run.

During training, `create_training_evaluator(config.evals, module, mesh)`
builds the same evaluation once (inputs validated at start, one
compilation) for every epoch, on any number of processes.

Images are normalised `(x / 255 - 0.5) / 0.5` for every network, as
insightface's evaluation does; each image and its horizontal flip are
embedded in one jitted call of a fixed batch size (the last batch is padded),
sharded over all devices on a 1-D 'data' mesh.
"""

from absl import app

from synthdistill_jax.evaluation import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main, flags_parser=cli.parse_flags)
