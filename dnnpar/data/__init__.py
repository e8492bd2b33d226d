"""Data sets: Fashion-MNIST from IDX files, and the sample embedded in the package."""
from . import fashion_mnist  # noqa: F401
from .fashion_mnist import batches, load  # noqa: F401
