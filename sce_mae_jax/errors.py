"""The error a user can fix: its own module so config files and the command line raise it without importing
JAX or orbax."""


class ConfigError(ValueError):
    """A user-facing problem with the config, workdir or a checkpoint; the message says how to fix it."""


class RunStopped(ConfigError):
    """A run stopped to keep its workdir safe (non-finite loss, full disk, workdir in use by another run); the
    message says what was kept and how to go on."""


def cause_of(exc: BaseException | None, kind: type) -> BaseException | None:
    """The first exception of type `kind` in `exc`'s chain of causes and contexts (libraries such as orbax and
    grain wrap the error the user can act on), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
