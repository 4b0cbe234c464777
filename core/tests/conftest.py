"""Make the helper modules beside these tests importable (pytest runs in importlib mode)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
