"""REPA / CREPA representation alignment: ``repa_helper.RepaHelper`` (registered as ``repa``), ``config.RepaConfig``."""
