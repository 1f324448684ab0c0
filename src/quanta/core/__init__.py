"""Core: instructions in, pokes out, responses into the Responses database."""

from .service import Core, SwitchLink

__all__ = ["Core", "SwitchLink"]
