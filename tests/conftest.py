"""Shared pytest setup: float32 parity settings and 8 simulated CPU devices."""

import os

# Multi-device tests run on 8 simulated CPU devices; this must be set before
# jax initialises its backends, so it lives here rather than in the tests.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Parity tests compare against float32 PyTorch on CPU: use exact matmuls.
jax.config.update("jax_default_matmul_precision", "highest")
