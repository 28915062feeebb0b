"""Acceleration presets: what they are (`models.presets.policy`, torch-free) and how they are
applied to a loaded transformer (`models.presets.apply`)."""
