"""The whole chain on the lab: `inv deploy.all` converges every host, a second
run changes nothing and says so, and a dry run after it would change nothing."""

import pytest

from tests.lab.labhost import recap

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def deployed(lab):
    out = lab.converge("deploy.all")
    ok, changed, failed = recap(out)
    assert failed == 0 and ok + changed > 0
    return lab


def test_second_deploy_changes_nothing_and_says_so(deployed):
    out = deployed.invoke("deploy.all")
    assert out.returncode == 0, out.stdout[-3000:]
    ok, changed, failed = recap(out)
    assert (changed, failed) == (0, 0), out.stdout[-6000:]
    assert ok > 0
    assert "nothing to do" in out.stdout


def test_dry_run_on_a_converged_site_would_change_nothing(deployed):
    out = deployed.invoke("deploy.all", "--check")
    assert out.returncode == 0, out.stdout[-3000:]
    assert recap(out)[1:] == (0, 0), out.stdout[-6000:]


def test_every_host_was_reached(deployed):
    out = deployed.invoke("deploy.common", "--check")
    recap_table = out.stdout[out.stdout.rindex("Recap:"):]
    missing = [host for host in deployed.hosts if host not in recap_table]
    assert not missing, recap_table
