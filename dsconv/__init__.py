"""dsconv: pneumonia detection in chest X-rays by transfer learning on MobileNet v1,
in NumPy and Numba."""
import argparse

__version__ = "0.1.0"


class DsconvError(Exception):
    """An error the user can fix (a bad file, folder, option or model), with what to do.

    The command-line entry points print these in one line and exit 2; any
    other exception is a bug and keeps its traceback.
    """


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
