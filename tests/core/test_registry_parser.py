"""registry reads entry_points.txt itself, without configparser: the PyPA format, and what it skips."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dpkit.core.tools import registry
from dpkit.core.tools.registry import EntryTarget, parse_entry_points

TEXT = """\
# a comment
; another comment
[console_scripts]
tool=pkg.cli:main

[dpkit.vendors]
  MyVendor   =   my_pkg.vendor:MyVendor
needs_extra = my_pkg.other:Other [gpu, fast]
    # an indented comment
empty =
"""


def test_sections_comments_spaces_case_and_extras() -> None:
    assert parse_entry_points(TEXT) == {
        "console_scripts": {"tool": "pkg.cli:main"},
        "dpkit.vendors": {"MyVendor": "my_pkg.vendor:MyVendor", "needs_extra": "my_pkg.other:Other [gpu, fast]",
                          "empty": ""},
    }


def test_a_malformed_line_is_skipped_and_the_rest_is_kept() -> None:
    text = "orphan = before:any_header\n[g]\nno equals sign here\n = no_name:x\na = m:a\n[also broken\nb = m:b\n"
    assert parse_entry_points(text) == {"g": {"a": "m:a", "b": "m:b"}}


def test_a_repeated_section_adds_to_it_and_the_last_value_of_a_name_wins() -> None:
    assert parse_entry_points("[g]\na = m:a\n[h]\nx = m:x\n[g]\nb = m:b\na = m:a2\n") == {
        "g": {"a": "m:a2", "b": "m:b"}, "h": {"x": "m:x"}}


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Path]:
    """A directory first on sys.path, for fake installed distributions."""
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))


def _dist(site: Path, info: str, text: str | bytes) -> None:
    (site / info).mkdir()
    path = site / info / "entry_points.txt"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


def test_the_first_distribution_of_a_name_on_sys_path_wins(site: Path,
                                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    later = tmp_path_factory.mktemp("later")
    sys.path.insert(1, str(later))
    try:
        _dist(site, "Fake_Dist-1.0.dist-info", "[test.group]\nfirst = a:b\n")
        _dist(later, "fake.dist-2.0.dist-info", "[test.group]\nshadowed = c:d\n")
        _dist(later, "other-1.0.dist-info", "[test.group]\nfirst = e:f\nsecond = g:h\n")
        assert registry.entry_points("test.group") == {
            "first": EntryTarget("a:b", "fake-dist"), "second": EntryTarget("g:h", "other")}
    finally:
        sys.path.remove(str(later))


def test_a_non_utf8_file_is_skipped(site: Path) -> None:
    _dist(site, "broken-1.0.dist-info", b"[test.group]\nbad = \xff\xfe:x\n")
    _dist(site, "good-1.0.dist-info", "[test.group]\ngood = m:o\n")
    assert registry.entry_points("test.group") == {"good": EntryTarget("m:o", "good")}


def test_the_scan_does_not_import_configparser() -> None:
    from child_process import loaded_after

    code = "from dpkit.core.tools.registry import entry_points; entry_points('dpkit.vendors')"
    assert loaded_after(code, ("configparser",)) == []
