"""SoundSentry edge runtime: capture, features, int8 inference, events, MQTT.

This package is what runs on the Raspberry Pi. It must stay light: numpy, the LiteRT
interpreter, paho-mqtt, pydantic-settings, soundfile and soxr -- never TensorFlow or
librosa (a test holds that line).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("soundsentry")
    """The installed distribution's: 0.1.1.devN+gHASH from a git checkout (pyproject.toml)."""
except PackageNotFoundError:  # run from a tree that was never installed
    __version__ = "0+unknown"
