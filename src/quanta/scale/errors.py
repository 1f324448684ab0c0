"""The one error type of the SCALE package."""

from __future__ import annotations


class ScaleError(Exception):
    """A payload problem, with the line and column (1-based) where it was found.

    ``str(error)`` is ``"<message> at line L, column C"``.
    """

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        self.message = message
        self.line = line
        self.column = column
        super().__init__(self.__str__())

    def __str__(self) -> str:
        if self.line <= 0:
            return self.message
        return f"{self.message} at line {self.line}, column {self.column}"

    def __repr__(self) -> str:
        return f"ScaleError({self.message!r}, line={self.line}, column={self.column})"

    def to_json(self) -> dict[str, object]:
        return {"message": self.message, "line": self.line, "column": self.column}
