"""dsconv: pneumonia detection in chest X-rays by transfer learning on MobileNet v1,
in NumPy and Numba."""
__version__ = "0.1.0"


class DsconvError(Exception):
    """An error the user can fix (a bad file, folder, option or model), with what to do.

    The command-line entry points print these in one line and exit 2; any
    other exception is a bug and keeps its traceback.
    """


def load_model(path, threshold=None, cache_dir=None):
    """A trained classifier with predict_proba / predict; see dsconv.predict."""
    from dsconv.predict import load_model
    return load_model(path, threshold, cache_dir)
