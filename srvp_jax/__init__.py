"""srvp_jax: Stochastic Latent Residual Video Prediction (SRVP, ICML 2020) in JAX/Flax.

Data flow: ``srvp_jax.preparation`` (makes the data) -> ``srvp_jax.data`` (input pipelines) ->
``srvp_jax.model`` (Flax NNX modules) -> ``srvp_jax.train`` / ``srvp_jax.evaluate`` -> ``srvp_jax.checkpoints``.
The tools share ``srvp_jax.cli``. TensorFlow is imported only through ``srvp_jax.import_order``, where a
TensorFlow format is read or TensorBoard events are written, so the model, training step, prediction and
benchmarks run on machines without it.
"""

__version__ = '0.1.0'
