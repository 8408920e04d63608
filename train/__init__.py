"""SoundSentry training: datasets, the Keras model, int8 quantisation, thresholds, evaluation.

Importing this package is cheap; TensorFlow is imported only by the modules that train or
convert (`train.model`, `train.quantize`, `train.trainer`).
"""
