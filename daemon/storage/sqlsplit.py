"""Splitting a migration file into statements the way the MySQL client reads them.

A ``;`` ends a statement only outside quotes, backticks and comments, so a
semicolon inside a string literal (a ``COMMENT '...; ...'``, a prepared
``ALTER`` in a string) stays part of its statement. Lexical rules from the
MySQL 8.0 Reference Manual, 11.1 "String Literals" (``'`` and ``"`` strings,
backslash escapes, a doubled quote), 11.2 "Schema Object Names" (backticks,
a doubled backtick) and 11.7 "Comments" (``#``, ``-- `` followed by a space or
control character, ``/* */``, with ``/*! */`` kept as executable). MariaDB
reads them the same way (MariaDB KB "Comment Syntax", "String Literals").
"""

from __future__ import annotations

from typing import Final

_QUOTES: Final = "'\"`"


def split_statements(sql: str) -> list[str]:
    """The statements of ``sql``, stripped, comments left out, empty ones skipped."""
    statements: list[str] = []
    current: list[str] = []
    i, end = 0, len(sql)
    while i < end:
        char = sql[i]
        if char in _QUOTES:
            close = _quoted_end(sql, i)
            current.append(sql[i:close])
            i = close
        elif char == "#" or (sql.startswith("--", i) and (i + 2 == end or sql[i + 2] <= " ")):
            newline = sql.find("\n", i)
            i = end if newline < 0 else newline  # the newline itself still separates words
        elif sql.startswith("/*", i):
            close = sql.find("*/", i + 2)
            close = end if close < 0 else close + 2
            if sql.startswith("/*!", i) or sql.startswith("/*M!", i):
                current.append(sql[i:close])  # executable comment: the server reads it
            else:
                current.append(" ")
            i = close
        elif char == ";":
            statements.append("".join(current))
            current = []
            i += 1
        else:
            current.append(char)
            i += 1
    statements.append("".join(current))
    return [statement.strip() for statement in statements if statement.strip()]


def _quoted_end(sql: str, start: int) -> int:
    """Index just past the string or quoted name that opens at ``start`` (the end of ``sql``
    when it never closes: the server then reports the error on the whole statement)."""
    quote = sql[start]
    i = start + 1
    while i < len(sql):
        char = sql[i]
        if char == "\\" and quote != "`":
            i += 2
        elif char == quote:
            if sql.startswith(quote, i + 1):  # doubled: an escaped quote, not the end
                i += 2
            else:
                return i + 1
        else:
            i += 1
    return len(sql)
