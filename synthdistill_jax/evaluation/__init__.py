"""Face-recognition evaluation: verification bins, IJB-B/C, reports, CLI.

Rooms: `settings` (the `config.evals` block), `embedding` (jitted, sharded
image + flip embedder), `verification` (insightface's 10-fold protocol),
`ijb` (IJB-B/C meta files, alignment, pooling, TAR@FAR), `outcome`,
`benchmarks` (read, validate, embed and score every configured set),
`training` (the per-epoch evaluator of the trainer), `reports` (markdown,
JSON, ROC curves, scores) and `cli` (`python -m synthdistill_jax.evaluate`).
"""
