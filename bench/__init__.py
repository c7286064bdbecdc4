"""The project's benchmark scripts (run from the repository root as ``python -m bench.<script>``).

Not part of the installed distribution; see ``bench/common.py`` for the shape every script shares.
"""
