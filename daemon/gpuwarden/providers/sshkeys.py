"""SSH public-key identity, shared by the clients that register our key on an account."""

from __future__ import annotations


def key_material(public_key: str) -> str:
    """ "ssh-ed25519 AAAA... comment" -> "ssh-ed25519 AAAA...": comments do not identify keys."""
    return " ".join(public_key.split()[:2])
