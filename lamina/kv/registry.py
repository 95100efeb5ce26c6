"""Retention policies by name; `retention_policy_for` is what the engine calls at start."""

from __future__ import annotations

from lamina.config import CacheConfig
from lamina.kv.h2o import H2OPolicy
from lamina.kv.retention import RetentionPolicy
from lamina.kv.streaming import StreamingPolicy

_POLICIES: dict[str, type[RetentionPolicy]] = {}


def register_retention_policy(cls: type[RetentionPolicy]) -> type[RetentionPolicy]:
    """Class decorator: make a policy selectable from a cache config (its `from_config`)."""
    _POLICIES[cls.name] = cls
    return cls


def registered_retention_policies() -> dict[str, type[RetentionPolicy]]:
    return dict(_POLICIES)


def retention_policy_for(cache: CacheConfig) -> RetentionPolicy:
    """The policy the cache config asks for: the first registered non-dense policy whose
    `from_config` accepts it, else dense."""
    for name, cls in _POLICIES.items():
        if name != RetentionPolicy.name:
            policy = cls.from_config(cache)
            if policy is not None:
                return policy
    return RetentionPolicy(cache.block_size)


for _builtin in (RetentionPolicy, StreamingPolicy, H2OPolicy):
    register_retention_policy(_builtin)
