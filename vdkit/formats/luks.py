"""LUKS (version 1) header parsing, as far as image info needs it.

Placeholder replaced by the full parser; see ``parse_luks_header``.
"""

from __future__ import annotations

LUKS_MAX_HEADER = 16 * 1024 * 1024
