"""A safety verdict for untrusted images: is this file safe to hand to QEMU?

Services that accept uploaded disk images must decide before any QEMU process
opens them.  Image-format CVEs of the last decade came from trusting what the
header points at: a backing or external data file (``/etc/passwd``), VMDK
extents naming host files or devices, a declared format that differs from the
content (a "raw" upload that is really a qcow2 with a backing file), or a
header that lies about sizes.  So the inspector:

* parses every piece of metadata the format driver knows (via the same driver
  vdkit uses to read, within the limits QEMU enforces), with the file opened
  read-only and **no** reference followed: nothing the image names is opened;
* asks the driver for the files the image refers to
  (:meth:`~vdkit.block.driver.FormatDriver.references`) and for problems in
  its own metadata (:meth:`~vdkit.block.driver.FormatDriver.inspect_issues`);
* reports ``safe`` only when there is no reason at all, else ``unsafe`` with
  every reason found, each with a stable ``kind`` for programs.

A file that cannot be read at all (missing, permission) raises
:class:`~vdkit.errors.VdkitError`; an image that does not parse is *unsafe*
(QEMU would refuse it, and a parser disagreement is itself an attack shape).
"""

from __future__ import annotations

import os

from vdkit.errors import VdkitError
from vdkit.record import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from vdkit.block.driver import FormatDriver


@record
class Reason:
    """One reason an image is unsafe: ``kind`` for programs, ``detail`` for people."""

    kind: str
    detail: str


@record
class Verdict:
    """The inspector's answer for one file."""

    filename: str
    format: str | None
    virtual_size: int | None
    reasons: list[Reason] = field(default_factory=list)

    @property
    def safe(self) -> bool:
        return not self.reasons

    @property
    def verdict(self) -> str:
        return "safe" if self.safe else "unsafe"


def inspect_image(filename: str | os.PathLike[str], *, fmt: str | None = None,
                  max_virtual_size: int | None = None) -> Verdict:
    """Inspect ``filename`` without following any reference it makes.

    ``fmt`` is the format the uploader declared (a mismatch with the content is
    a reason); ``max_virtual_size`` is the largest disk the caller accepts.
    """
    from vdkit.block.chain import OpenPolicy
    from vdkit.block.driver import OpenContext
    from vdkit.formats import registry
    from vdkit.io.file import ImageFile

    name = os.fspath(filename)
    if fmt is not None and not registry.is_known(fmt):
        raise VdkitError(f"Unknown file format '{fmt}'")
    try:
        file = ImageFile(name, readonly=True, force_share=True)
    except VdkitError:
        raise
    except OSError as exc:  # pragma: no cover - ImageFile maps these itself
        raise VdkitError(f"Could not open '{name}': {exc.strerror}") from exc
    reasons: list[Reason] = []
    verdict = Verdict(name, None, None, reasons)
    try:
        import stat

        st = os.fstat(file.fd)
        if not stat.S_ISREG(st.st_mode):
            reasons.append(Reason("not-a-regular-file", "the image is not a regular file"))
        probed = registry.probe_format(file.pread(0, registry.PROBE_SIZE), name)
        verdict.format = fmt or probed
        # Content that probes as another format is a mismatch.  Content that probes as raw while
        # another format was declared is not in itself: some formats have no probe signature QEMU
        # trusts (a fixed VHD's footer is at the end); the declared driver must then parse it.
        if fmt is not None and probed != fmt and probed != registry.PROBE_FALLBACK:
            reasons.append(Reason("format-mismatch", f"declared format '{fmt}', but the content is '{probed}'"))
        if not registry.is_known(verdict.format):
            reasons.append(Reason("unsupported-format", f"format '{verdict.format}' cannot be parsed by vdkit"))
            return verdict
        # Nothing may be followed: the policy refuses every reference (the driver is not asked
        # to open children at all; the policy is a second fence).
        policy = OpenPolicy(follow_backing=False, follow_data_file=False, allowed_dirs=())
        ctx = OpenContext(name, readonly=True, force_share=True, check_mode=True, no_io=True, policy=policy)
        try:
            driver = registry.open_driver(verdict.format, file, ctx)
        except VdkitError as exc:
            reasons.append(Reason("invalid-metadata", exc.message))
            return verdict
        try:
            _inspect_driver(driver, name, verdict, max_virtual_size)
        finally:
            driver.close()
            file = None  # type: ignore[assignment]  # closed by the driver
    finally:
        if file is not None:
            file.close()
    return verdict


def _inspect_driver(driver: FormatDriver, name: str, verdict: Verdict, max_virtual_size: int | None) -> None:
    reasons = verdict.reasons
    try:
        verdict.virtual_size = driver.virtual_size
    except VdkitError as exc:
        reasons.append(Reason("invalid-metadata", exc.message))
        return
    if max_virtual_size is not None and verdict.virtual_size > max_virtual_size:
        reasons.append(Reason("size-limit",
                              f"virtual size {verdict.virtual_size} exceeds the limit {max_virtual_size}"))
    if driver.encrypted:
        reasons.append(Reason("encrypted", "the image is encrypted"))
    folder = os.path.dirname(os.path.abspath(name))
    image_real = os.path.realpath(name)
    for kind, ref in driver.references():
        reason = _reference_reason(kind, ref, folder, image_real, driver.format_name)
        if reason is not None:
            reasons.append(reason)
    for kind, detail in driver.inspect_issues():
        reasons.append(Reason(kind, detail))


def _reference_reason(kind: str, ref: str, folder: str, image_real: str, own_format: str) -> Reason | None:
    """A file the image names.  Backing and data files are always reasons (the image makes QEMU
    open another file); an extent is one only when it leaves the image's own folder, is not a
    regular file, or is itself an image of another format (QEMU reads extents as raw data, but
    any tool that probes the extent file would not): a sparse extent must probe as the format
    naming it (``own_format``), a plain extent as nothing at all (the probe's fallback)."""
    label = kind.replace("-", " ")
    if kind not in ("extent", "sparse-extent"):
        return Reason(kind, f"{label} '{ref}'")
    if ref.startswith("json:") or (":" in ref.split("/", 1)[0]):
        return Reason("extent-protocol", f"extent '{ref}' names a protocol")
    if os.path.isabs(ref):
        return Reason("extent-absolute", f"extent '{ref}' is an absolute path")
    full = os.path.normpath(os.path.join(folder, ref))
    real = os.path.realpath(full)
    if real == image_real:
        return None  # a monolithic image's descriptor names the image itself
    if os.path.dirname(full) != folder or os.path.dirname(real) != os.path.realpath(folder):
        return Reason("extent-outside", f"extent '{ref}' is outside the image's folder")
    try:
        import stat

        st = os.stat(real)
    except OSError:
        return Reason("extent-missing", f"extent '{ref}' does not exist")
    if not stat.S_ISREG(st.st_mode):
        return Reason("extent-not-regular", f"extent '{ref}' is not a regular file")
    from vdkit.formats import registry

    try:
        with open(real, "rb") as f:
            head = f.read(registry.PROBE_SIZE)
    except OSError:
        return Reason("extent-missing", f"extent '{ref}' cannot be read")
    probed = registry.probe_format(head, real)
    if probed != (own_format if kind == "sparse-extent" else registry.PROBE_FALLBACK):
        return Reason("extent-format", f"extent '{ref}' is itself a {probed} image")
    return None
