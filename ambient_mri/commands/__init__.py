"""The command layer: one click command per module, ``ambient-mri <name>``.

Each module here parses options, calls the library (imported at module top) and prints. The library
modules (``ambient_mri/*.py``) never import click; everything a command does is reachable from Python
through the ``run_*`` function it calls.
"""
