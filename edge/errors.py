"""User-facing errors: each one becomes a single line on stderr, never a traceback."""


class SoundSentryError(Exception):
    """A problem the user can fix (bad input, bad setting, bad model); shown as one line."""


class AudioError(SoundSentryError):
    """An audio file that cannot be read as audio."""


class BundleError(SoundSentryError):
    """A model bundle that is missing, corrupt or incompatible with this version."""


class SettingsError(SoundSentryError):
    """An invalid setting (file, environment or flag)."""
