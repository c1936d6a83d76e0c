"""The kernel build stamps: a module is rebuilt when any source it compiles changes, its own
files or the header every module includes (omlx/kernels/cpu/common.h)."""

import shutil

import pytest

from omlx.kernels import build


def _stamps() -> dict[str, str]:
    return {module: build.stamp_text(module) for module in build.MODULES}


@pytest.fixture
def source_copy(tmp_path, monkeypatch):
    """The kernel sources copied to a scratch directory the stamps are read from."""
    for source in build.SOURCE_DIR.iterdir():
        if source.is_file():
            shutil.copy(source, tmp_path / source.name)
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    return tmp_path


def test_setup_built_every_module_from_the_current_sources():
    """The kernels' tests skip where a module cannot run on a CPU; a module that failed to
    build must fail here instead of turning those tests into silent skips."""
    missing = [m for m in build.MODULES if not build.is_current(m)]
    assert missing == [], f"not built or stale (python -m omlx.kernels.build): {missing}"


def test_the_shared_header_is_in_every_modules_stamp(source_copy):
    before = _stamps()
    header = source_copy / "common.h"
    header.write_text(header.read_text() + "\n// an edit\n")
    after = _stamps()
    assert all(before[m] != after[m] for m in build.MODULES), (before, after)


def test_a_modules_own_source_changes_only_its_stamp(source_copy):
    before = _stamps()
    source = source_copy / "quant_linear.cpp"
    source.write_text(source.read_text() + "\n// an edit\n")
    after = _stamps()
    assert after["_quant_linear_cpu"] != before["_quant_linear_cpu"]
    assert after["_linear_cpu"] == before["_linear_cpu"]
    assert after[build.ATTENTION] == before[build.ATTENTION]
