"""Helpers the step kinds share (uv, venvs, wheels, manifests, `expect:` checks, job logs).

A package, not a module of `provision.steps`, so the kinds registry never takes it for a kind.
Like the kinds' top level, these import only the standard library (they run on the box's
plain python3).
"""
