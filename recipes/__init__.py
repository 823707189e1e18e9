"""Recipes: command-line front ends that reproduce the papers' studies with torchopt_metagrad.

Run one with ``python -m recipes.<name> [options]`` (``--help`` lists the options,
``--quick`` is a preset that finishes in minutes on a laptop CPU). Each recipe also
exposes ``main(argv) -> dict`` for tests. See ``recipes/README.md``.
"""
