"""Test suite of synthdistill-jax."""
