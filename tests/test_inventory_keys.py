"""A key file ssh could not use is bad input, named by inventory file, line and host (exit 2),
not an "unreachable" host: missing, unreadable, a directory, or readable by others (ssh refuses
a private key with group/other permissions: "UNPROTECTED PRIVATE KEY FILE")."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from provision.errors import ConfigError, TargetError
from provision.inventory import load_inventory, resolve_targets

INVENTORY = """\
hosts:
  good: {host: 127.0.0.1, key: KEY_GOOD}
  bad:
    host: 127.0.0.1
    key: KEY_BAD
groups: {both: [good, bad]}
"""


def _inventory(tmp_path: Path, bad_key: str) -> Path:
    good = tmp_path / "id_good"
    good.write_text("private\n")
    good.chmod(0o600)
    path = tmp_path / "inventory.yaml"
    path.write_text(INVENTORY.replace("KEY_GOOD", str(good)).replace("KEY_BAD", bad_key))
    return path


def _error(tmp_path: Path, bad_key: str, target: str = "bad") -> str:
    inv = load_inventory(_inventory(tmp_path, bad_key))
    with pytest.raises(ConfigError) as raised:
        resolve_targets([target], inv)
    return str(raised.value)


def test_a_missing_key_names_file_line_and_host(tmp_path: Path) -> None:
    message = _error(tmp_path, str(tmp_path / "absent"))
    assert message == (
        f"{tmp_path}/inventory.yaml:5: host 'bad': key file {tmp_path}/absent does not exist"
    )


def test_a_key_others_can_read_is_refused_as_ssh_would(tmp_path: Path) -> None:
    loose = tmp_path / "id_loose"
    loose.write_text("private\n")
    loose.chmod(0o644)
    message = _error(tmp_path, str(loose), target="both")  # a group: the bad member is named
    assert message.startswith(f"{tmp_path}/inventory.yaml:5: host 'bad': key file {loose} ")
    assert "permissions 0644" in message and f"chmod 600 {loose}" in message


def test_a_directory_or_unreadable_key_is_refused(tmp_path: Path) -> None:
    assert _error(tmp_path, str(tmp_path)).endswith(f"key file {tmp_path} is not a file")
    if os.geteuid() != 0:  # root reads any file
        locked = tmp_path / "id_locked"
        locked.write_text("x")
        locked.chmod(0o000)
        assert _error(tmp_path, str(locked)).endswith("is not readable by you")


def test_good_keys_pass_and_a_pasted_command_key_is_checked_too(tmp_path: Path) -> None:
    inv = load_inventory(_inventory(tmp_path, str(tmp_path / "absent")))
    assert [h.name for h in resolve_targets(["good"], inv)] == ["good"]
    with pytest.raises(TargetError, match=r"key file /nonexistent/k does not exist"):
        resolve_targets(["ssh -p 2222 -i /nonexistent/k root@1.2.3.4"], inv)
