"""Offline data preparation: download, raw readers, the video store, official test sets, inspection, throughput.

The steps of ``python -m srvp_jax.data`` (``cli.py``). Each dataset's module (``kth``, ``human``,
``bair``, ``mmnist``) adds the steps (``steps.Preparation``) to its streaming class of ``srvp_jax.data``,
with its raw readers next to them; ``raw`` holds what the readers share. This package imports the
streaming side (``srvp_jax.data``), never the reverse: training, validation and evaluation need none of it.
"""
