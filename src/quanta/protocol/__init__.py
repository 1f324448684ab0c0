"""Quanta's wire protocol and its pure (sans-I/O) behaviour.

``quanta.protocol.messages`` holds the wire messages, the codec and the poke; its public names
are re-exported here, so tools written against the former ``quanta.protocol`` module keep
working (``from quanta.protocol import Hello, Response, encode``).
"""

from quanta.protocol.messages import *  # noqa: F401,F403
from quanta.protocol.messages import __all__  # noqa: F401
