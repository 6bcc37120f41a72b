"""Concept sliders: ``slider_helper.SliderHelper`` (registered as ``slider``), section ``config.SliderConfig``."""
