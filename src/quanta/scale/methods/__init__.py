"""SCALE method library: one module per SCALE module. Importing this package registers them."""

from . import (  # noqa: F401
    agent,
    device,
    filesystem,
    interaction,
    inventory,
    nativeservices,
    network,
    operatingsystem,
    scripting,
    software,
    storage,
    tagging,
    users,
    utilities,
)
