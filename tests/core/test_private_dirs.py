"""files' private directories (bind staging, state_dir fallback) keep mkdtemp's guarantees without tempfile."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dpkit.core.support import files


def test_a_private_dir_is_0700_new_absolute_and_prefixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    old = os.umask(0)
    try:
        made = [files._make_private_dir(Path("."), ".dpkit-bind-") for _ in range(3)]
    finally:
        os.umask(old)
    assert len(set(made)) == 3
    for path in made:
        assert path.is_absolute() and path.parent == tmp_path and path.name.startswith(".dpkit-bind-")
        st = os.lstat(path)
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700


def test_a_planted_name_is_skipped_never_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Randomness fixed so the first name is the planted one: the helper must pass over it."""
    planted = tmp_path / f"p-{'00' * 8}"
    planted.symlink_to(tmp_path / "elsewhere")
    draws = iter([b"\0" * 8, b"\1" * 8])
    monkeypatch.setattr(os, "urandom", lambda n: next(draws))
    made = files._make_private_dir(tmp_path, "p-")
    assert made == tmp_path / f"p-{'01' * 8}" and made.is_dir() and not made.is_symlink()
    assert planted.is_symlink() and not (tmp_path / "elsewhere").exists()


def test_gives_up_after_a_bounded_number_of_taken_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / f"p-{'00' * 8}").mkdir()
    monkeypatch.setattr(os, "urandom", lambda n: b"\0" * n)
    with pytest.raises(FileExistsError):
        files._make_private_dir(tmp_path, "p-", attempts=5)


def test_files_does_not_import_tempfile() -> None:
    from child_process import loaded_after

    assert loaded_after("import dpkit.core.support.files", ("tempfile",)) == []
