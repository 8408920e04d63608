"""SoundSentry edge runtime: capture, features, int8 inference, events, MQTT.

This package is what runs on the Raspberry Pi. It must stay light: numpy, the LiteRT
interpreter, paho-mqtt, pydantic-settings, soundfile and soxr -- never TensorFlow or
librosa (a test holds that line).
"""

__version__ = "0.1.0"
