"""Empty on purpose: installs made before 0.1.1 name this module as a ``pytest11`` entry point.

The plugin is opt-in now (:mod:`structenv.testing.pytest_plugin`); until such an install is
refreshed (``pip install -e .``), pytest still imports this module at start-up.
"""
