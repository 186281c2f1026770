"""Machine translation of story corpora: sentence splitting, sharded and resumable translation
with NLLB / M2M100 checkpoints (transformers or CTranslate2), output filters and shard merging.

`jaxlm.mt.translate` holds the pipeline and `jaxlm.mt.cli` the `jaxlm translate` command.
"""
