"""Empty on purpose: installs made while the plugin was auto-loaded name this module as their
``pytest11`` entry point, so pytest imports it at start-up until the install is refreshed
(``pip install -e .``). The plugin is opt-in now: :mod:`structenv.testing.pytest_plugin`.
"""
