"""The admin panel's signing secret (omlx/admin/session.py): made once per home, and when
several processes start on a fresh home at once they all end up with the one on disk."""

from __future__ import annotations

import concurrent.futures
import os
import stat

from omlx.admin.session import load_secret


def test_processes_starting_together_share_one_secret(tmp_path):
    home = tmp_path / "home"
    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        secrets_ = list(pool.map(load_secret, [home] * 8))
    on_disk = bytes.fromhex((home / "admin_secret").read_text().strip())
    assert all(s == on_disk for s in secrets_)
    assert len(on_disk) == 32
    assert stat.S_IMODE(os.stat(home / "admin_secret").st_mode) == 0o600
    assert sorted(p.name for p in home.iterdir()) == ["admin_secret"]  # no temporary left behind
    assert load_secret(home) == on_disk  # and it is kept
