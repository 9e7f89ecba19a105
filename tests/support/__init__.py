"""Test support shared by the oracle tests: awkward trees, rsync as the reference, snapshots.

Importable as ``support`` because pytest puts ``tests/`` on ``sys.path`` (the rootdir
conftest's directory, prepend import mode); tests import it, never conftest.
"""
