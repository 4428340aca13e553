"""The error a user can fix: its own module so config files and the command line raise it without importing
JAX or orbax."""


class ConfigError(ValueError):
    """A user-facing problem with the config, workdir or a checkpoint; the message says how to fix it."""


class RunStopped(ConfigError):
    """A run stopped to keep its workdir safe (non-finite loss, full disk, workdir in use by another run); the
    message says what was kept and how to go on."""
