"""Value types and path handling for settings.py, kept apart so that the schema stays one
readable page: OpenSSH public key lines (ssh.authorized_keys), and relative paths in a config
file made absolute against the file's own directory."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, get_args

from pydantic import BaseModel, BeforeValidator

_PUBLIC_KEY = re.compile(
    r"^(ssh-ed25519|ssh-rsa|ecdsa-sha2-nistp(256|384|521)|sk-\S+) [A-Za-z0-9+/]+=*( .*)?$"
)


def _public_key(value: object) -> str:
    if not isinstance(value, str) or not _PUBLIC_KEY.match(value.strip()):
        raise ValueError(
            "not an OpenSSH public key line ('ssh-ed25519 AAAA... comment', as in a .pub file)"
        )
    return value.strip()


PublicKey = Annotated[str, BeforeValidator(_public_key)]


def against_file(data: dict[str, Any], model: type[BaseModel], base: Path) -> dict[str, Any]:
    """`data` with every relative path the file gives made absolute against the file's own
    directory: a config names paths beside itself, wherever the daemon or the CLI runs from.
    (A path from the environment stays relative to the current directory.)"""
    for name, field in model.model_fields.items():
        key = field.alias or name
        value = data.get(key)
        sub = field.annotation
        if isinstance(value, dict) and isinstance(sub, type) and issubclass(sub, BaseModel):
            data[key] = against_file(value, sub, base)
        elif isinstance(value, str) and value and Path in (sub, *get_args(sub)):
            path = Path(value).expanduser()
            data[key] = str(path if path.is_absolute() else base.absolute() / path)
    return data
