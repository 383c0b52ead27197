"""Error types shared by the entry points (no TensorFlow import: cheap to load)."""


class ConfigError(ValueError):
    """A user mistake in a run configuration; the message names the flag."""
