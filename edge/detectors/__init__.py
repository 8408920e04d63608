"""Detector kinds, one module each, found through `registry.plugin_for(manifest)`.

A kind scores log-mel windows from a bundle, explains a score by frequency band, gives its
event tracker (one interface for all kinds) and refits its numpy part on site (`calibrate`,
learning on site). Fitting that needs TensorFlow lives in `train/` beside it.
"""
