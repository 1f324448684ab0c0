"""Catalog: software normalisation (raw publisher/title/version -> vendor/product/version/category).

Public interface: :class:`RawEntry`, :class:`Normalized`, :func:`normalize_version`,
:func:`parse_rule_file` (raises :class:`RuleFileError` with a line number), :class:`Matcher`, and
:class:`CatalogClient` (HTTP client of ``/Catalog`` on the http port). Storage is in ``store``,
the FastAPI router in ``api``, the commands in ``cli``.
"""

from .rules import Matcher, Normalized, RawEntry, RuleFileError, normalize_version, parse_rule_file

__all__ = ["Matcher", "Normalized", "RawEntry", "RuleFileError", "normalize_version", "parse_rule_file",
           "CatalogClient", "CatalogError"]


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name in ("CatalogClient", "CatalogError"):
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
