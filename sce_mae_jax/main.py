"""Entry point for every job: `python -m sce_mae_jax.main --config=configs/X.py[:arg] --workdir=DIR`.

The config's `job` field picks the trainer or evaluator (`pretrain`: stage 1, `carb`: stage 2, `eval_matching`,
`eval_detection`, `eval_limited`: the evaluations, `pipeline`: the quick start's chain). Any field can be changed
with `--config.a.b=value`; unknown fields are rejected. On a multi-host TPU pod pass `--distributed`; to run
several processes by hand (or in tests) pass the coordinator address, process count and id.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from sce_mae_jax import cli, errors, fileio, jobs
from sce_mae_jax.errors import ConfigError

config_flags.DEFINE_config_file('config', None, 'Job config file (configs/*.py[:arg]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and figures go; rerun to resume.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with no arguments (Cloud TPU pods, '
                  'SLURM): every host runs the same command.')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0, for a hand-launched multi-process run.')
flags.DEFINE_integer('num_processes', 1, 'With --coordinator_address: number of processes.')
flags.DEFINE_integer('process_id', 0, 'With --coordinator_address: this process.')
flags.DEFINE_bool('verbose', False, 'On an error, print its traceback before the one-line message.')


def user_errors() -> tuple[type, ...]:
    from sce_mae_jax.data.sources import DatasetError
    return ConfigError, DatasetError


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f'unexpected arguments: {argv[1:]}')
    from sce_mae_jax import workdir as workdir_lib
    message = workdir_lib.problem(FLAGS.workdir)  # before JAX starts: a bad path costs a second, not a compile
    if message is not None:
        sys.exit(f'error: {message}')
    cli.quiet_library_logs()
    import jax
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                                   process_id=FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    from sce_mae_jax import hardware
    hardware.log_backend(jax)  # and a warning when a GPU/TPU host runs on the CPU backend
    config = FLAGS.config  # checked by parse_flags: a known job, datasets and splits
    job = config.job
    logging.info('job %s on %d devices, %d processes (the config: WORKDIR/config.json, or --verbosity=1)', job,
                 jax.device_count(), jax.process_count())
    logging.vlog(1, 'config:\n%s', config)
    from sce_mae_jax import fileio
    new_workdir = not fileio.exists(FLAGS.workdir)
    try:
        with workdir_lib.workdir_lock(FLAGS.workdir):  # a second run on this workdir stops here
            jobs.run(config, FLAGS.workdir)
    except Exception as e:  # pylint: disable=broad-except
        message = _one_line(e)
        if message is None:
            raise
        if FLAGS.verbose:
            logging.exception('the error below, with its traceback (--verbose)')
        logging.error('%s', message)
        # bad input writes nothing: the workdir this run made only to hold its lock goes again
        try:
            if new_workdir and jax.process_index() == 0 and fileio.isdir(FLAGS.workdir) \
                    and not fileio.listdir(FLAGS.workdir):
                fileio.rmtree(FLAGS.workdir)
        except OSError:
            pass
        _exit(1, f'error: {message}', quick=errors.storage_cause(e) is not None)
    from sce_mae_jax.train import common
    signum = common.preempted_by()
    if signum is not None:  # after the final checkpoint: tells a scheduler to requeue (launch/slurm.sh does)
        _exit(128 + signum, f'stopped by signal {signum} after checkpointing; exit status {128 + signum} '
              '(preempted); rerun the same command to resume', quick=False)


def _one_line(e: BaseException) -> str | None:
    """The one-line message for an error the user can act on; None for a bug (its traceback is printed)."""
    if isinstance(e, user_errors()):
        return str(e)
    found = errors.storage_cause(e)
    if found is None:
        return None
    from sce_mae_jax.train import checkpoints
    code, path = found
    return errors.storage_message(code, path, 'a file of the workdir', checkpoints.newest_intact(
        os.path.join(fileio.resolve(FLAGS.workdir), 'checkpoints')))


def _exit(status: int, line: str, quick: bool):
    """Exits with `line` on stderr. After a refused write (`quick`), without the interpreter's shutdown: the
    asynchronous checkpoint writer's leftover tasks would print pages of tracebacks about the same error."""
    print(line, file=sys.stderr, flush=True)
    if quick:
        logging.flush()
        sys.stdout.flush()
        os._exit(status)
    sys.exit(status)


FLAGS = flags.FLAGS


def parse_flags(argv):
    """absl parsing, but every command-line mistake ends with one line naming it and the valid choices."""
    asks_help = any(a.split('=')[0] in ('-h', '--help', '--helpshort', '--helpfull', '-?') for a in argv)
    message = None if asks_help else cli.problem(argv)
    if message is not None:
        sys.exit(f'error: {message}')
    try:
        return FLAGS(argv)
    except flags.Error as e:
        sys.exit(f'error: {" ".join(str(e).split())} (--helpfull lists the flags)')


if __name__ == '__main__':
    flags.mark_flags_as_required(['config', 'workdir'])
    app.run(main, flags_parser=parse_flags)
