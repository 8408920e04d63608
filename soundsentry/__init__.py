"""SoundSentry's front door: the `soundsentry` command and the reports it prints and draws.

This package sits above the two libraries and may import both: `edge` (the runtime on the
Pi, which imports neither of the others) and `train` (training and evaluation, which may
import `edge` but never this package). The command imports `train`, TensorFlow and
matplotlib only inside the subcommands that need them, so a bare edge install runs it too.

Nothing is imported here: `soundsentry.cli` must set its thread environment before numpy
is loaded.
"""
