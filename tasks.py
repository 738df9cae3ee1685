"""Root namespace: `inv --list` shows one collection per tier."""

from invoke import Collection

from fabfile import base, deploy, firewall, gateway, lab, pki
from fabfile.core.tasks import CONFIG_DEFAULTS

ns = Collection()
ns.configure(CONFIG_DEFAULTS)
for module in (lab, base, gateway, firewall, pki, deploy):
    ns.add_collection(Collection.from_module(module))
