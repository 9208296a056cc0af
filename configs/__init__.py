"""The paper setups and the quick start: each module's ``get_config()`` returns a locked config.

``launch.py --config configs/NAME.py`` loads one by path (``ml_collections.config_flags``), applies
``--config.KEY=VALUE`` overrides and validates the result once; ``import configs.NAME`` works too.
Each sets only what differs from the defaults (``srvp_jax.config``, the official ``args.py`` ones); the
test protocol is the paper's for the dataset (``config.PAPER_TEST``) unless ``test_*`` keys are set.
"""
