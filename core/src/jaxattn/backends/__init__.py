"""Backends that ship with the core: only `xla`, the reference that runs everywhere."""
