"""Data sets: Fashion-MNIST from IDX files, the sample embedded in the package, and user data sets (.npz)."""
from . import fashion_mnist  # noqa: F401
from .fashion_mnist import batches, load  # noqa: F401
from . import user  # noqa: F401
from .user import load_user_data  # noqa: F401
