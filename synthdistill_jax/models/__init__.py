"""Flax models: StyleGAN2 generator, IResNet, MobileFaceNet, TinyFaR students.

`create_model(arch, **kwargs)` builds a module by name; `load(directory)` reads
a converted or trained model folder back (see `registry`).
"""

from synthdistill_jax.models import registry

architectures = registry.architectures
create_model = registry.create_model
load = registry.load
save = registry.save
