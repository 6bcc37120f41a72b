"""Differential output preservation: ``dop_helper.DopHelper`` (registered as ``dop``), section ``config.DopConfig``."""
