"""Command-line mistakes as one line each: what is wrong and what the valid choices are.

`problem(argv)` loads `--config=FILE[:arg]` with its `--config.x=y` overrides exactly as `main.py` will, and
returns the message for the first mistake it finds (None when the command line is fine): a missing config
file, an unknown config argument or ablation after ':', an unknown or mistyped `--config.x` field, an unknown
job, dataset or split. It runs before JAX is imported, so a typo costs a second, not a compile.
"""
from __future__ import annotations

import difflib
import glob
import importlib.util
import os
import re

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from sce_mae_jax.errors import ConfigError


class _QuietLibraries:
    """At the default verbosity, drops orbax's INFO records (dozens per checkpoint save or restore) and its warning
    that a restore left out the data iterator (loading parameters leaves it out on purpose), so that progress,
    results and real warnings stay readable; `--verbosity=1` shows them all. Without `--verbose`, orbax's error
    records lose their tracebacks and keep their first line: a failed write is reported once, in the line main
    ends with."""

    def filter(self, record):
        if 'orbax' not in record.pathname:
            return True
        if record.levelno >= 40 and not _verbose():
            message = record.getMessage()
            record.msg, record.args = (message.splitlines()[0][:300] if message else ''), ()
            record.exc_info = record.exc_text = None
        if logging.get_verbosity() >= 1:
            return True
        return record.levelno > 20 and not record.getMessage().startswith('Item "data_iter" was found')


def _verbose() -> bool:
    try:
        return bool(flags.FLAGS.verbose)
    except (AttributeError, flags.UnparsedFlagAccessError):  # a command without main's --verbose flag
        return False


def quiet_library_logs() -> None:
    """Installs the filter on absl's handler, once (jobs call it from their main)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


def problem(argv: list[str]) -> str | None:
    try:
        check_config(load_config(argv))
    except ConfigError as e:
        return str(e)
    return None


def load_config(argv: list[str]) -> ml_collections.ConfigDict:
    """`--config` of `argv` (argv[0] is the program) with its overrides; ConfigError for a user mistake."""
    spec = _config_spec(argv)
    if spec is None:
        raise ConfigError('--config is required: e.g. --config=configs/quickstart.py (choose from '
                          f'{_listing("configs")})')
    path = spec.split(':', 1)[0]
    if not os.path.isfile(path):
        where = os.path.dirname(path) if os.path.isdir(os.path.dirname(path) or '.') else 'configs'
        raise ConfigError(f'config file {path} does not exist; choose one of {_listing(where)}')
    fv = flags.FlagValues()  # private flags: main's FLAGS are parsed afterwards, unchanged
    config_flags.DEFINE_config_file('config', None, 'config', flag_values=fv, lock_config=True, sys_argv=argv)
    try:
        fv(argv, known_only=True)
        return fv.config
    except (AttributeError, KeyError) as e:  # an override naming no field
        raise ConfigError(_unknown_field(argv, spec, e)) from None
    except flags.Error as e:
        user = _user_error(e)
        if user is not None:
            raise user from None
        if 'Traceback' in str(e):  # a bug in the config file itself: its traceback is the useful message
            raise
        raise ConfigError(' '.join(str(e).split())) from None


def check_config(config: ml_collections.ConfigDict) -> None:
    """The job, and the data and split of the config and of every config nested in it (the pipeline's)."""
    from sce_mae_jax import jobs
    from sce_mae_jax.data import sources

    job = config.get('job')
    if job not in jobs.JOBS:
        raise ConfigError(f'config.job={job!r} is not a job; choose one of {", ".join(sorted(jobs.JOBS))}')
    for prefix, node in _nodes(config, 'config'):
        if 'data' not in node:
            continue
        try:
            sources.check(node.data)
        except ConfigError as e:
            raise ConfigError(f'{prefix}.data: {e}') from None
        try:
            sources.check(node.data, node.get('split'))
        except ConfigError as e:
            raise ConfigError(f'{prefix}.split: {e}') from None


def _nodes(config, prefix):
    yield prefix, config
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from _nodes(value, f'{prefix}.{key}')


def _config_spec(argv):
    for i, arg in enumerate(argv[1:], 1):
        m = re.fullmatch(r'--?config(=(.*))?', arg)
        if m:
            return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
    return None


def _listing(where: str) -> str:
    found = sorted(glob.glob(os.path.join(where, '*.py')))
    return ', '.join(found) if found else f'(no .py files in {where}/)'


def _user_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError a config file raised, from under the wrappers absl and ml_collections add (the latter
    re-raises it as a ConfigError carrying the traceback text: the innermost one is the user's message)."""
    found, seen = None, set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            found = exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return found


def _unknown_field(argv, spec, exc) -> str:
    """Names the first override that is not a field, with the fields its parent has (closest first)."""
    path, _, arg = spec.partition(':')
    loader = importlib.util.spec_from_file_location('sce_mae_jax_config_check', path)
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    config = module.get_config(*([arg] if arg else []))
    for a in argv:
        m = re.match(r'--?config\.([^=]+)', a)
        if not m:
            continue
        node, keys = config, m.group(1).split('.')
        for depth, key in enumerate(keys):
            if not isinstance(node, ml_collections.ConfigDict) or key not in node:
                parent = '.'.join(['config', *keys[:depth]])
                if not isinstance(node, ml_collections.ConfigDict):
                    return f'--config.{m.group(1)}: {parent} is a value, not a group of fields'
                close = difflib.get_close_matches(key, list(node), n=3)
                hint = f'did you mean {", ".join(close)}? ' if close else ''
                return (f'--config.{m.group(1)}: {parent} has no field {key!r}; {hint}its fields are '
                        f'{", ".join(sorted(node))}')
            node = node[key]
    return f'unknown config field {exc}'
