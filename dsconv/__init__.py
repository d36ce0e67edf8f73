"""dsconv: pneumonia detection in chest X-rays by transfer learning on MobileNet v1,
in NumPy and Numba.

Exit statuses, the same for every entry point (python -m dsconv.train,
experiments, predict, calibrate, serve, weights, imagenet):

    0    done
    1    done in part: some inputs failed (an image, a grid run), each reported
    2    nothing done: a bad option, file, folder or model; one line on stderr
         (`error: <file>: what is wrong; what to do`), argparse's refusals too
    3    the outputs could not be written (a full disk or standard output, a
         read-only folder); nothing is left half-written
    130  interrupted (Ctrl-C), after keeping what was done and saying where

An unexpected exception (a bug) keeps its traceback and Python's status 1.
Diagnostics go to standard error, each line prefixed `error: ` (fail),
`warning: ` (warn: something is off, the run goes on) or `note: ` (note:
what the run did that one may not expect); standard output carries results.
"""
import argparse
import errno
import sys

__version__ = "0.1.0"


DONE, PARTIAL, USER_ERROR, NOT_WRITTEN, INTERRUPTED = 0, 1, 2, 3, 130
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


class DsconvError(Exception):
    """An error the user can fix (a bad file, folder, option or model), with what to do.

    The command-line entry points print these in one line and exit 2; any
    other exception is a bug and keeps its traceback.
    """


def fail(error, status=None):
    """Print ``error: <error>`` in one line on stderr and exit: NOT_WRITTEN for a full disk, else USER_ERROR."""
    if status is None:
        status = NOT_WRITTEN if getattr(error, "errno", None) in NO_SPACE else USER_ERROR
    print(f"error: {error}", file=sys.stderr)
    sys.exit(status)


def warn(message):
    """Print ``warning: <message>`` on stderr: something is off, and the run goes on."""
    print(f"warning: {message}", file=sys.stderr)


def note(message):
    """Print ``note: <message>`` on stderr: what the run did that one may not expect."""
    print(f"note: {message}", file=sys.stderr)


def interrupted(message):
    """Print ``interrupted: <message>`` on stderr and exit INTERRUPTED."""
    print(f"\ninterrupted: {message}", file=sys.stderr)
    sys.exit(INTERRUPTED)


def load_model(path, threshold=None, cache_dir=None):
    """A trained model with predict_proba, predict and diagnose; see dsconv.model."""
    from dsconv.model import load_model
    return load_model(path, threshold, cache_dir)


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help of the entry points: descriptions as written, and each option's default unless its help gives it
    (flags and options without a default say nothing)."""

    def _get_help_string(self, action):
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)
