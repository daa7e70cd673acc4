"""Helpers shared by the test suites (byte surgery on images, qemu-io scripts)."""
