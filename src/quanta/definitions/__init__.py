"""Instruction definitions and signed product packs."""

from .model import Definition, DefinitionError, bind_parameters, check_payload, parse_definition
from .packs import PackError, build, import_pack, keygen, load_definition, read_pack, trust

__all__ = ["Definition", "DefinitionError", "PackError", "bind_parameters", "build", "check_payload",
           "import_pack", "keygen", "load_definition", "parse_definition", "read_pack", "trust"]
