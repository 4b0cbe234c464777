"""The core's version, in one place: `jaxattn.__version__`, the package metadata (pyproject
reads it from here) and the check of which core a plugin was built for (`versions.py`)."""

__version__ = "0.1.0"
