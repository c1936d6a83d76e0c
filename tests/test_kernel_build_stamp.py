"""The kernel build stamps: a module is rebuilt when any source it compiles changes, its own
files or the header every module includes (omlx/kernels/cpu/common.h)."""

import shutil

from omlx.kernels import build


def _stamps() -> dict[str, str]:
    return {module: build.stamp_text(module) for module in build.MODULES}


def test_the_shared_header_is_in_every_modules_stamp(tmp_path, monkeypatch):
    for source in build.SOURCE_DIR.iterdir():
        if source.is_file():
            shutil.copy(source, tmp_path / source.name)
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    before = _stamps()
    header = tmp_path / "common.h"
    header.write_text(header.read_text() + "\n// an edit\n")
    after = _stamps()
    assert all(before[m] != after[m] for m in build.MODULES), (before, after)


def test_a_modules_own_source_changes_only_its_stamp(tmp_path, monkeypatch):
    for source in build.SOURCE_DIR.iterdir():
        if source.is_file():
            shutil.copy(source, tmp_path / source.name)
    monkeypatch.setattr(build, "SOURCE_DIR", tmp_path)
    before = _stamps()
    source = tmp_path / "quant_linear.cpp"
    source.write_text(source.read_text() + "\n// an edit\n")
    after = _stamps()
    assert after["_quant_linear_cpu"] != before["_quant_linear_cpu"]
    assert after["_linear_cpu"] == before["_linear_cpu"]
    assert after[build.ATTENTION] == before[build.ATTENTION]
