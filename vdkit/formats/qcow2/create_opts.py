"""qcow2's ``qemu-img create`` options (QEMU 7.2's list, in its order) and their translation."""

from __future__ import annotations

from vdkit.errors import VdkitError
from vdkit.opts import CreateOpts, OptDesc, refuse_encryption

ENCRYPT_OPTS = [
    OptDesc("encryption", "bool",
            help="Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)"),
    OptDesc("encrypt.format", "string", help="Encrypt the image, format choices: 'aes', 'luks'"),
    OptDesc("encrypt.key-secret", "string", help="ID of secret providing qcow AES key or LUKS passphrase"),
    OptDesc("encrypt.cipher-alg", "string", help="Name of encryption cipher algorithm"),
    OptDesc("encrypt.cipher-mode", "string", help="Name of encryption cipher mode"),
    OptDesc("encrypt.ivgen-alg", "string", help="Name of IV generator algorithm"),
    OptDesc("encrypt.ivgen-hash-alg", "string", help="Name of IV generator hash algorithm"),
    OptDesc("encrypt.hash-alg", "string", help="Name of encryption hash algorithm"),
    OptDesc("encrypt.iter-time", "number", help="Time to spend in PBKDF in milliseconds"),
]
OWN_OPTS = ENCRYPT_OPTS + [
    OptDesc("cluster_size", "size", "65536", "qcow2 cluster size"),
    OptDesc("extended_l2", "bool", "off", "Extended L2 tables"),
    OptDesc("preallocation", "string", None, "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    OptDesc("compression_type", "string", "zlib", "Compression method used for image cluster compression"),
    OptDesc("size", "size", None, "Virtual disk size"),
    OptDesc("compat", "string", None, "Compatibility level (v2 [0.10] or v3 [1.1])"),
    OptDesc("backing_file", "string", None, "File name of a base image"),
    OptDesc("backing_fmt", "string", None, "Image format of the base image"),
    OptDesc("data_file", "string", None, "File name of an external data file"),
    OptDesc("data_file_raw", "bool", None, "The external data file must stay valid as a raw image"),
    OptDesc("lazy_refcounts", "bool", "off", "Postpone refcount updates"),
    OptDesc("refcount_bits", "number", "16", "Width of a reference count entry in bits"),
]

_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}


def create_from_options(filename: str, opts: CreateOpts) -> None:
    """Validate ``opts`` as QEMU does (after creating and locking the file) and write the image."""
    from vdkit.formats.qcow2.create import Qcow2CreateOptions, create_file, create_qcow2
    from vdkit.io.file import remove_new_file

    # qemu-img creates (and locks) the file before it validates the options,
    # and removes it again when they are refused; a locked file stays as it is.
    file = create_file(filename)
    try:
        refuse_encryption(opts)
        compat = opts.get("compat")
        if compat is not None and compat not in _VERSIONS:
            raise VdkitError(f"Parameter 'version' does not accept value '{compat}'")
        prealloc = str(opts.get("preallocation", "off"))
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise VdkitError(f"Parameter 'preallocation' does not accept value '{prealloc}'")
        compression = str(opts.get("compression_type"))
        if compression not in ("zlib", "zstd"):
            raise VdkitError(f"Parameter 'compression-type' does not accept value '{compression}'")
        backing = opts.get("backing_file")
        backing_fmt = opts.get("backing_fmt")
        data_file = opts.get("data_file")
        o = Qcow2CreateOptions(
            size=int(opts.get("size") or 0),
            version=_VERSIONS[str(compat)] if compat is not None else 3,
            cluster_size=int(opts.get("cluster_size") or 0),
            refcount_bits=int(opts.get("refcount_bits") or 0),
            lazy_refcounts=bool(opts.get("lazy_refcounts")),
            extended_l2=bool(opts.get("extended_l2")),
            compression_type=compression,
            preallocation=prealloc,
            backing_file=str(backing) if backing is not None else None,
            backing_fmt=str(backing_fmt) if backing_fmt is not None else None,
            data_file=str(data_file) if data_file is not None else None,
            data_file_raw=bool(opts.get("data_file_raw", False)),
        )
    except VdkitError:
        file.close()
        remove_new_file(filename)  # never a device written in place
        raise
    create_qcow2(filename, o, file)
