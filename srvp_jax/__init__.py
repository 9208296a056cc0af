"""srvp_jax: Stochastic Latent Residual Video Prediction (SRVP, ICML 2020) in JAX/Flax.

Data flow: ``srvp_jax.data`` (input pipelines) -> ``srvp_jax.model`` (Flax NNX modules)
-> ``srvp_jax.train`` / ``srvp_jax.evaluate`` -> ``srvp_jax.checkpoints``.
TensorFlow is only imported inside the input-pipeline modules, so the model, training step,
prediction and benchmarks run on machines without it.
"""

__version__ = '0.1.0'
