"""The qcow2 format driver (versions 2 and 3)."""
