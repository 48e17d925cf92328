"""Tenants of the awake endpoint: who a key belongs to, where their memory lives, how fast they may ask.

A tenant is a storage folder of its own (its short-term memory, its sleeps, its expert
stack, its adapter versions), served as its own LoRA adapter over the shared base model:

    cycle.storage/                  the tenant "default" (serve.api_key, or no key at all)
    cycle.storage/tenants/NAME/     every other tenant (the layout of ``sleepray.storage``)

API keys are kept only as SHA-256 hashes (``serve.tenants_file``)::

    tenants:
      alice: {keys: [<sha256 hex>], rate_limit_rps: 5}
      bob:   {keys: [<sha256 hex>]}
    admins: [<sha256 hex>]           # may list tenants, read their status, ask for their sleeps

``sleepray keys add --file F --tenant alice`` makes a key, prints it once and stores its hash.
``serve.api_key`` (plain text in the config) stays as the one-user shortcut: the tenant
"default", admin too. With no key at all every request is the tenant "default", and
:func:`check_bind` refuses a non-loopback address unless ``serve.allow_open``.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from sleepray.storage import Storage, write_text

DEFAULT = "default"
TENANT_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_HEX = re.compile(r"^[0-9a-f]{64}$")


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def check_name(name: str) -> str:
    if not isinstance(name, str) or not TENANT_RE.match(name):
        raise ValueError(f"tenant name {name!r}: use 1-63 of a-z 0-9 _ -, starting with a letter or digit")
    return name


def tenant_storage(root, tenant: str) -> Storage:
    """The storage folder of ``tenant`` under ``cycle.storage``."""
    root = Path(root)
    return Storage(root if tenant == DEFAULT else root / "tenants" / check_name(tenant))


@dataclass(frozen=True)
class Principal:
    """Who sent a request: a tenant (None for an admin-only key) and whether it is an admin."""
    tenant: Optional[str]
    admin: bool = False
    rate_limit_rps: Optional[float] = None


class KeyRing:
    """Key hash -> :class:`Principal`; ``open`` when no key is configured at all."""

    def __init__(self, principals: dict[str, Principal], tenants: list[str]):
        self._by_hash = dict(principals)
        self.tenants = sorted(set(tenants))
        self.open = not self._by_hash

    @classmethod
    def from_config(cls, scfg) -> "KeyRing":
        principals: dict[str, Principal] = {}
        tenants: list[str] = []
        if scfg.api_key:
            principals[key_hash(scfg.api_key)] = Principal(DEFAULT, admin=True)
            tenants.append(DEFAULT)
        if scfg.tenants_file:
            for h, p in load_keys(scfg.tenants_file).items():
                if h in principals:
                    raise ValueError(f"{scfg.tenants_file}: a key is listed twice")
                principals[h] = p
                if p.tenant:
                    tenants.append(p.tenant)
        if not principals:
            tenants = [DEFAULT]
        return cls(principals, tenants)

    def authenticate(self, key: Optional[str]) -> Optional[Principal]:
        """The key's principal (None: unknown); with no keys configured, the tenant "default"."""
        if self.open:
            return Principal(DEFAULT)
        if not key:
            return None
        return self._by_hash.get(key_hash(key))   # a hash lookup: no timing leak of the key


def load_keys(path) -> dict[str, Principal]:
    """Hash -> principal from a tenants file; a clear ``ValueError`` for anything malformed."""
    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ValueError(f"serve.tenants_file {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ValueError(f"serve.tenants_file {p}: not YAML: {e}") from None
    if not isinstance(data, dict) or set(data) - {"tenants", "admins"}:
        raise ValueError(f"{p}: expected the keys 'tenants' and 'admins' only")
    out: dict[str, Principal] = {}

    def put(h, principal, where):
        if not isinstance(h, str) or not _HEX.match(h):
            raise ValueError(f"{p}: {where}: keys are SHA-256 hex digests (64 of 0-9a-f), never plain keys")
        if h in out:
            raise ValueError(f"{p}: {where}: a key hash is listed twice")
        out[h] = principal

    for name, spec in (data.get("tenants") or {}).items():
        check_name(name)
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"keys", "rate_limit_rps"}:
            raise ValueError(f"{p}: tenants.{name}: expected 'keys' and optional 'rate_limit_rps'")
        rps = spec.get("rate_limit_rps")
        if rps is not None and (not isinstance(rps, (int, float)) or rps < 0):
            raise ValueError(f"{p}: tenants.{name}.rate_limit_rps must be a number >= 0")
        for h in spec.get("keys") or []:
            put(h, Principal(name, rate_limit_rps=rps), f"tenants.{name}")
    for h in data.get("admins") or []:
        put(h, Principal(None, admin=True), "admins")
    return out


def add_key(path, tenant: Optional[str], admin: bool = False) -> str:
    """A new random key for ``tenant`` (or an admin key); only its hash is written to ``path``."""
    p = Path(path).expanduser()
    data = {}
    if p.exists():
        load_keys(p)                                   # refuse to extend a malformed file
        data = yaml.safe_load(p.read_text()) or {}
    key = "sr-" + secrets.token_urlsafe(32)
    if admin:
        data.setdefault("admins", []).append(key_hash(key))
    else:
        tenants = data.setdefault("tenants", {})
        spec = tenants.get(check_name(tenant)) or {}
        spec.setdefault("keys", []).append(key_hash(key))
        tenants[tenant] = spec
    write_text(p, yaml.safe_dump(data, sort_keys=True))
    p.chmod(0o600)
    return key


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(scfg) -> None:
    """Refuse to serve a non-loopback address with no API key (every user would share one memory
    and could ask for sleeps), unless ``serve.allow_open``."""
    if is_loopback(scfg.host) or scfg.api_key or scfg.tenants_file or scfg.allow_open:
        return
    raise ValueError(f"serve.host={scfg.host} is reachable from other machines, but no API key is set: set "
                     "serve.api_key or serve.tenants_file (sleepray keys add), or serve.allow_open=true to "
                     "serve it open on purpose")


class RateLimiter:
    """A token bucket per tenant: ``rps`` requests a second, ``burst`` at once (thread-safe)."""

    def __init__(self, rps: float, burst: int):
        self.rps, self.burst = float(rps), int(burst)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, tenant: str, rps: Optional[float] = None) -> Optional[float]:
        """None when the request may go, else the seconds until it could."""
        rate = self.rps if rps is None else float(rps)
        if rate <= 0:
            return None
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(tenant, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * rate)
            if tokens >= 1:
                self._buckets[tenant] = (tokens - 1, now)
                return None
            self._buckets[tenant] = (tokens, now)
            return (1 - tokens) / rate
