"""Faces: the Python client and the ``ajs`` command line."""
