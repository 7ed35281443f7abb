"""API tokens (``[[api.tokens]]``): a secret, the functions it may touch and the actions it may
take. Checked by the HTTP API, the console's login and the gateway's private routes."""

from __future__ import annotations

import fnmatch

from bridge.log import register_secret
from bridge.models import ApiToken, read_secret_file


class Token:
    def __init__(self, cfg: ApiToken) -> None:
        self.name = cfg.name
        secret = cfg.secret if cfg.secret is not None else read_secret_file(cfg.secret_file)  # type: ignore[arg-type]
        if not secret:
            raise ValueError(f"api token {cfg.name}: empty secret")
        self.secret = secret.encode()
        register_secret(secret)
        self.functions = list(cfg.functions)
        self.actions = set(cfg.actions)

    def allows(self, action: str, function: str | None) -> bool:
        if action not in self.actions and "admin" not in self.actions:
            return False
        if function is None:
            return True
        return any(fnmatch.fnmatchcase(function, pat) for pat in self.functions)
