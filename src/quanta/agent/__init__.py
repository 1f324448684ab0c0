"""Agent (the 1E Client's role): a wss connection to a Switch, verified instructions, responses."""

from .config import AgentConfig, load_agent_config
from .runtime import Agent

__all__ = ["Agent", "AgentConfig", "load_agent_config"]
