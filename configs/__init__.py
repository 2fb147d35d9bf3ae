"""Experiment configs: one `get_config(arg)` per file.

Every field is commented in `synthdistill_jax/defaults.py` (`base_config`);
experiment files (`demo.py`, `synthdistill.py`) override only what differs.
On the command line any field can be changed:
`--config.schedule.batch_size=64`.
"""

from synthdistill_jax import defaults

base_config = defaults.base_config
