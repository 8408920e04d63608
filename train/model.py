"""The Keras models: a compact convolutional autoencoder on log-mel windows."""

from __future__ import annotations

import keras
from keras import layers

ARCHITECTURE = "conv-ae-v1"
FILTERS = (16, 32, 64)
"""Encoder channels per stride-2 stage (the decoder mirrors them)."""
BOTTLENECK = 8
BN_MOMENTUM = 0.9
"""Batch-norm statistics must settle within the few hundred steps of a small recording."""
"""Channels of the 1x1 bottleneck."""


def _pad_to(n: int, multiple: int) -> int:
    return (-n) % multiple


def build_autoencoder(frames: int, mels: int) -> keras.Model:
    """Conv autoencoder: (frames, mels, 1) -> same shape; padded internally to a multiple of 8."""
    stride_total = 2 ** len(FILTERS)
    pad_t, pad_f = _pad_to(frames, stride_total), _pad_to(mels, stride_total)
    inp = keras.Input((frames, mels, 1), name="logmel")
    x = layers.ZeroPadding2D(((0, pad_t), (0, pad_f)))(inp)
    for ch in FILTERS:
        x = layers.Conv2D(ch, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = layers.ReLU()(x)
    x = layers.Conv2D(BOTTLENECK, 1, padding="same", activation="relu", name="bottleneck")(x)
    for ch in reversed(FILTERS):
        x = layers.Conv2DTranspose(ch, 3, strides=2, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = layers.ReLU()(x)
    x = layers.Conv2D(1, 3, padding="same", name="reconstruction")(x)
    out = layers.Cropping2D(((0, pad_t), (0, pad_f)))(x)
    return keras.Model(inp, out, name=ARCHITECTURE)


CLASSIFIER = "cnn-classifier-v1"
CLASSIFIER_FILTERS = (16, 32, 64)
DROPOUT = 0.3


def build_classifier(frames: int, mels: int, n_classes: int) -> keras.Model:
    """Compact CNN: three conv blocks, global average pooling, softmax over the classes."""
    inp = keras.Input((frames, mels, 1), name="logmel")
    x = inp
    for i, ch in enumerate(CLASSIFIER_FILTERS):
        x = layers.Conv2D(ch, 3, padding="same", use_bias=False)(x)
        x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
        x = layers.ReLU()(x)
        if i < len(CLASSIFIER_FILTERS) - 1:
            x = layers.MaxPooling2D(2)(x)
    x = layers.GlobalAveragePooling2D()(x)
    x = layers.Dropout(DROPOUT)(x)
    out = layers.Dense(n_classes, activation="softmax", name="classes")(x)
    return keras.Model(inp, out, name=CLASSIFIER)
