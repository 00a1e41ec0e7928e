"""The error a bad input raises: it names the file, the row (1-based line or array index) and the field."""

from __future__ import annotations


class DataError(ValueError):
    """One line: `FILE, row N, field 'F': PROBLEM[; HINT]`. The hint says how to get past it (e.g. skip_bad_rows)."""

    def __init__(self, path, row, field, problem: str, hint: str = ""):
        self.path, self.row, self.field, self.problem, self.hint = str(path), row, field, problem, hint
        where = f"{self.path}"
        if row is not None:
            where += f", row {row}"
        if field:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}{'; ' + hint if hint else ''}")
