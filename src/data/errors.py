"""The error a bad input raises: it names the file, the row (1-based line or array index) and the field."""

from __future__ import annotations


class DataError(ValueError):
    def __init__(self, path, row, field, problem: str):
        self.path, self.row, self.field, self.problem = str(path), row, field, problem
        where = f"{self.path}"
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")
