"""Root namespace: `inv --list` shows one collection per tier."""

from invoke import Collection

from fabfile import deploy, lab

ns = Collection()
for module in (lab, deploy):
    ns.add_collection(Collection.from_module(module))
