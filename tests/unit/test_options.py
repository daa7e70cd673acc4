"""getopt_long quirks qemu-img inherits from glibc, and that vdkit reproduces.

The parse results are checked directly; the error texts are also checked
against qemu-img (``info`` uses the same option table shape).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data import generate as g
from tests.data.compare import same
from vdkit.cli.main import LongOpt, getopt_long, output_format
from vdkit.errors import UsageError, VdkitError

LONG = [
    LongOpt("help", False, "h"),
    LongOpt("format", True, "f"),
    LongOpt("output", True, "output"),
    LongOpt("object", True, "object"),
    LongOpt("backing-chain", False, "backing-chain"),
    LongOpt("force-share", False, "U"),
    LongOpt("force-other", False, "U"),
]


def parse(*argv: str) -> tuple[list[tuple[str, str | None]], list[str]]:
    p = getopt_long(list(argv), ":f:hqU", LONG)
    return p.opts, p.args


def test_permutation_options_after_operands() -> None:
    assert parse("a.img", "-U", "--output=json") == ([("U", None), ("output", "json")], ["a.img"])


def test_double_dash_ends_options() -> None:
    assert parse("-q", "--", "-U", "--output=json") == ([("q", None)], ["-U", "--output=json"])


def test_bundled_and_attached_short_options() -> None:
    assert parse("-qUfqcow2", "x") == ([("q", None), ("U", None), ("f", "qcow2")], ["x"])
    assert parse("-qf", "raw", "x") == ([("q", None), ("f", "raw")], ["x"])


def test_lone_dash_is_an_operand() -> None:
    assert parse("-", "-q") == ([("q", None)], ["-"])


def test_long_option_value_forms() -> None:
    assert parse("--output", "json", "x")[0] == [("output", "json")]
    assert parse("--output=", "x")[0] == [("output", "")]
    assert parse("--output=a=b", "x")[0] == [("output", "a=b")]


def test_unique_prefixes() -> None:
    assert parse("--back", "--out=json", "--form=raw", "x")[0] == [
        ("backing-chain", None), ("output", "json"), ("f", "raw")]


def test_prefix_of_same_meaning_is_not_ambiguous() -> None:
    """glibc only calls a prefix ambiguous when the candidates differ (force-share/force-other -> U)."""
    assert parse("--force", "x")[0] == [("U", None)]


def test_exact_match_beats_prefix() -> None:
    long = [LongOpt("out", False, "a"), LongOpt("output", True, "output")]
    assert getopt_long(["--out"], "", long).opts == [("a", None)]


@pytest.mark.parametrize(("argv", "message"), [
    (["--o=json"], "unrecognized option '--o=json'"),
    (["--nosuch"], "unrecognized option '--nosuch'"),
    (["--help=1"], "unrecognized option '--help=1'"),
    (["-x"], "unrecognized option '-x'"),
    (["-Ux"], "unrecognized option '-Ux'"),
    (["-xU"], "unrecognized option '-xU'"),  # without argv0 the bundle itself is named
])
def test_errors(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as exc:
        parse(*argv)
    assert exc.value.message == message


def test_unknown_letter_mid_bundle_names_previous_argument() -> None:
    """glibc has not advanced optind yet: qemu-img names argv[optind - 1]."""
    for argv, shown in ((["-xU"], "info"), (["a", "-qxU"], "a"), (["-Ux"], "-Ux")):
        with pytest.raises(UsageError) as exc:
            getopt_long(argv, ":f:hqU", LONG, argv0="info")
        assert exc.value.message == f"unrecognized option '{shown}'"


def test_missing_argument() -> None:
    with pytest.raises(UsageError):
        parse("-f")
    with pytest.raises(UsageError):
        parse("--output")


def test_output_format() -> None:
    assert output_format(None) == "human"
    assert output_format("json") == "json"
    with pytest.raises(VdkitError) as exc:
        output_format("JSON")
    assert not isinstance(exc.value, UsageError)
    assert exc.value.message == "--output must be used with human or json as argument."


@pytest.mark.parametrize("args", [
    ["info", "-qUf"], ["info", "-Uf", "qcow2"], ["info", "--f=qcow2", "q.qcow2"], ["info", "--fo", "qcow2", "q.qcow2"],
    ["info", "-Ux", "q.qcow2"], ["info", "q.qcow2", "-Uxq"], ["info", "-U", "-xU", "q.qcow2"],
    ["info", "--ou=json", "--", "q.qcow2"], ["info", "-Uq", "q.qcow2"], ["info", "-y"],
    ["info", "--back=1", "q.qcow2"], ["info", "--output=json", "--", "-q.qcow2"], ["info", "--out", "--", "q.qcow2"],
    ["snapshot", "-lq", "q.qcow2"], ["snapshot", "-a"], ["snapshot", "-lUq", "--", "q.qcow2"],
    ["snapshot", "-l", "-d", "x", "q.qcow2"], ["snapshot", "q.qcow2"], ["snapshot", "-f", "qcow2", "-l", "q.qcow2"],
    ["snapshot", "--force", "-l", "q.qcow2"], ["snapshot", "-lx", "q.qcow2"],
    ["nosuchcommand"], [],
])
def test_against_qemu_img(args: list[str], tmp_path: Path) -> None:
    g.create(tmp_path, "q.qcow2", "1M")
    same(args, tmp_path)
