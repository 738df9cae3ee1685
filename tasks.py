"""Root namespace: `inv --list` shows one collection per tier."""

from invoke import Collection

from fabfile import base, deploy, firewall, gateway, lab, pki
from fabfile import ejabberd, keepalived, postgres
from fabfile import dbproxy, mail, pxc
from fabfile import cluster, drbd, monitoring, webmail
from fabfile import backup, rescue, status, walarchive
from fabfile.core.tasks import CONFIG_DEFAULTS

ns = Collection()
ns.configure(CONFIG_DEFAULTS)
for module in (lab, base, gateway, firewall, pki, postgres, walarchive, ejabberd, keepalived, pxc, dbproxy, mail, drbd, cluster, webmail,
               monitoring, backup, deploy):
    ns.add_collection(Collection.from_module(module))
# The rescue procedures stand on several tiers (like deploy); an operator finds
# them with the tier they rescue.
ns.collections["postgres"].add_task(rescue.promote)
ns.collections["postgres"].add_task(walarchive.backup)
ns.collections["postgres"].add_task(walarchive.restore)
ns.collections["postgres"].add_task(rescue.rejoin)
ns.collections["ejabberd"].add_task(rescue.remove_node)
ns.add_collection(Collection("rescue", rescue.replace))
ns.add_task(status.status)  # `inv status`: every tier in one table
