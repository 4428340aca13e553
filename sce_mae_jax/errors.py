"""The error a user can fix: its own module so config files and the command line raise it without importing
JAX or orbax."""


class ConfigError(ValueError):
    """A user-facing problem with the config, workdir or a checkpoint; the message says how to fix it."""
