"""dsconv: pneumonia detection in chest X-rays by transfer learning on MobileNet v1,
in NumPy and Numba."""
__version__ = "0.1.0"
