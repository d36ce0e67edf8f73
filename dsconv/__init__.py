"""dsconv: pneumonia detection in chest X-rays by transfer learning on MobileNet v1,
in NumPy and Numba."""
__version__ = "0.1.0"


def load_model(path, threshold=None, cache_dir=None):
    """A trained classifier with predict_proba / predict; see dsconv.predict."""
    from dsconv.predict import load_model
    return load_model(path, threshold, cache_dir)
