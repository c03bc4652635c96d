"""The Redis engine: the shmnonce guarantees for processes on any number of hosts.

::

    from shmnonce.redis import RedisNonce
    eng = RedisNonce.attach("orders", url="redis://host:6379/0", lease_s=10.0)
    eng = RedisNonce.for_api_key(key, url="redis://...")

Needs the optional extra: ``pip install 'shmnonce[redis]'`` (redis-py 5 or later)
and a Redis server 6.2 or later. See docs/redis.md for the guarantees, the
failure modes and the recommended persistence and ACL settings.
"""

from __future__ import annotations

from .conn import RedisUnavailable
from .doctor import check_server
from .engine import MAX_VALUE, RedisNonce, RedisRecord, RedisSection

__all__ = ["MAX_VALUE", "RedisNonce", "RedisRecord", "RedisSection", "RedisUnavailable", "check_server"]
