"""Consumer API: the public REST API under /Consumer."""

from .app import ADMIN_ROLE, ConsumerApi, create_app, hash_password

__all__ = ["ADMIN_ROLE", "ConsumerApi", "create_app", "hash_password"]
