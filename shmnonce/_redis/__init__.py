"""The Redis engine's internals; the public face is :mod:`shmnonce.redis`."""
