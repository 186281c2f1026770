"""Sparse autoencoders on jaxlm MLP activations: architectures, activation store, trainer, I/O.

`sae` builds on `jaxlm` (models, data, checkpoints, sharding); `jaxlm` never imports `sae`.
"""
