"""EMA of the trained weights: ``ema_helper.EmaHelper`` (registered as ``ema``), section ``config.EmaConfig``."""
