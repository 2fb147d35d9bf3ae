r"""`python -m synthdistill_jax.evaluate`: face-recognition evaluation CLI.

  python -m synthdistill_jax.evaluate --model DIR --bins lfw.bin,agedb_30.bin

Flags, outputs and error handling: `synthdistill_jax.evaluation.cli`.
"""

from synthdistill_jax import hostmem

# Before the heavy imports below, as `synthdistill_jax.main` does.
if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app

from synthdistill_jax.evaluation import cli

if __name__ == "__main__":
  cli.define_flags()
  app.run(cli.main, flags_parser=cli.parse_flags)
