"""Self-correction: ``self_correction_helper.SelfCorrectionHelper`` (registered as ``self_correction``), ``config.SelfCorrectionConfig``."""
