"""The embedded lab: real Debian hosts as systemd-nspawn containers on this machine."""
