"""The protocol registry (vdkit.protocols.registry) agrees with the protocol modules it names.

Front ends ask the registry instead of comparing names, so a prefix or driver missing from it (or a
module missing an entry point) would silently send a name down the local-file path: these tests hold
the table and the modules together.
"""

from __future__ import annotations

import pytest

from vdkit.block.chain import QEMU_PROTOCOLS, protocol_of
from vdkit.formats import registry as formats
from vdkit.protocols import registry


@pytest.mark.parametrize("driver", sorted(registry.PROTOCOLS))
def test_every_protocol_has_the_entry_points(driver: str) -> None:
    module = registry.protocol_module(driver)
    assert callable(module.name_for_options) and callable(module.open_file)
    creation = [hasattr(module, n) for n in ("create_raw", "create_for_format", "CREATE_PLACE")]
    assert all(creation) or not any(creation), "creation entry points come together"
    assert registry.creates_images(driver) == all(creation)
    # a protocol is also a registered top-node format of the same name (no format layer)
    assert formats.is_known(driver)


@pytest.mark.parametrize(("prefix", "driver"), sorted(registry.PREFIXES.items()))
def test_prefixes_are_qemus_and_name_their_driver(prefix: str, driver: str) -> None:
    assert prefix in QEMU_PROTOCOLS
    assert driver in registry.PROTOCOLS
    assert registry.driver_for_prefix(protocol_of(f"{prefix}://host/x")) == driver


def test_no_protocol_for_local_names() -> None:
    assert registry.driver_for_prefix(protocol_of("/tmp/x.img")) is None
    assert registry.driver_for_prefix("file") is None
    assert not registry.is_protocol("file") and not registry.is_protocol(None) and not registry.is_protocol("raw")


def test_formats_requiring_their_protocol_are_protocols() -> None:
    """``NAME_REQUIRED`` (block.node refuses other names) only makes sense for a protocol's own top node."""
    for name in formats.format_names():
        if hasattr(formats.format_module(name), "NAME_REQUIRED"):
            assert registry.is_protocol(name), name
