"""Filtering ops of the StyleGAN2 generator, in pure `jax.lax`."""
