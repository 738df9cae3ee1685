import os
import stat

import pytest

from fabfile.core.errors import UserError
from fabfile.core.secrets import Secrets, token


def test_generated_once_then_reused(tmp_path):
    path = tmp_path / "site.secrets.yml"
    first = Secrets(path).get("db_password")
    assert len(first) == 32 and first.isalnum()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Secrets(path).get("db_password") == first
    assert Secrets(path).get("other") != first


def test_group_readable_file_is_refused(tmp_path):
    path = tmp_path / "site.secrets.yml"
    Secrets(path).get("x")
    os.chmod(path, 0o644)
    with pytest.raises(UserError, match=r"site.secrets.yml: secrets file is readable by others \(mode 0644\)"):
        Secrets(path)


def test_missing_operator_secret_names_file_and_key(tmp_path):
    with pytest.raises(UserError, match=r"s.yml: missing secret 'ipmi_password' \(BMC password\)"):
        Secrets(tmp_path / "s.yml").require("ipmi_password", "BMC password")


def test_check_mode_does_not_write(tmp_path):
    path = tmp_path / "s.yml"
    assert Secrets(path, persist=False).get("x")
    assert not path.exists()


def test_mask_hides_values(tmp_path):
    s = Secrets(tmp_path / "s.yml")
    pw = s.get("pw")
    assert s.mask(f"password={pw};") == "password=***;"


def test_tokens_differ():
    assert len({token() for _ in range(50)}) == 50
