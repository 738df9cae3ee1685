"""The inventories shipped in inventory/ (not the secrets files that runs write beside them)."""

from fabfile.core.tasks import PROJECT_ROOT

INVENTORIES = [p for p in sorted((PROJECT_ROOT / "inventory").glob("*.yml")) if not p.name.endswith((".secrets.yml", ".roles.yml"))]
