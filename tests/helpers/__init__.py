"""Machinery the test suites share, one copy each (the test map in docs/ARCHITECTURE.md lists it)."""
