"""SQL text -> what may leave the node: literals replaced by ``?``, comments gone, length bounded.

Shared by the PostgreSQL and MySQL parsers. One pass of one regex over at most MAX_INPUT
characters: every token is a comment (dropped), a literal (``?``), a quoted identifier, a
word, a parameter or a single other character. A literal cut short by the capture (an
unterminated string, dollar quote or comment) runs to the end of the text and becomes ``?``
too, so a half-captured secret never leaks. Then lists of ``?`` collapse to one and the
operation (first keyword) and the single table a statement names are picked out, following
OpenTelemetry's db.query.summary ("{operation} {target}").
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from node_exporter.protocols.db import MAX_QUERY_TEXT

MAX_INPUT: Final = 4096  # characters of statement text looked at; the rest is not read
MAX_TEXT: Final = MAX_QUERY_TEXT  # characters of sanitized text kept (db.query.text)
MAX_NAME: Final = 128  # a collection name longer than this is not reported

# Order matters: comments and literals before words and operators. `(?s)` lets strings span lines.
_COMMON = (
    r"(?P<c>--[^\n]*|/\*(?:[^*]|\*(?!/))*(?:\*/|$))",  # comments; unterminated: to the end
    r"(?P<s>(?:[eEbBxXnN]|[uU]&)?'(?:[^'\\]|\\.|'')*(?:'|.*))",  # '...' with '' (and \ for E'', MySQL)
    r"(?P<n>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)",  # numbers, hex
)
_PG = re.compile(
    "|".join(
        (
            *_COMMON,
            r"(?P<d>\$(?P<tag>[A-Za-z_][A-Za-z0-9_]*|)\$(?:.*?\$(?P=tag)\$|.*$))",  # dollar quotes
            r"(?P<p>\$\d+)",  # positional parameter: kept
            r'(?P<q>"(?:[^"]|"")*(?:"|.*))',  # quoted identifier
            r"(?P<w>[A-Za-z_\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)",
            r"(?P<o>\S)",
        )
    ),
    re.S,
)
_MYSQL = re.compile(
    "|".join(
        (
            r"(?P<c>--[ \t][^\n]*|--$|#[^\n]*|/\*(?:[^*]|\*(?!/))*(?:\*/|$))",
            r'(?P<s>(?:[bBxXnN]|_[A-Za-z0-9]+)?(?:\'(?:[^\'\\]|\\.|\'\')*(?:\'|.*)|"(?:[^"\\]|\\.|"")*(?:"|.*)))',
            _COMMON[2],
            r"(?P<q>`(?:[^`]|``)*(?:`|.*))",
            r"(?P<w>@{0,2}[A-Za-z_$\x80-\uffff][A-Za-z0-9_$\x80-\uffff]*)",  # @user / @@system variables
            r"(?P<o>\S)",
        )
    ),
    re.S,
)
_DIALECTS: Final = {"postgresql": _PG, "mysql": _MYSQL}
_LIST = re.compile(r"\(\?(?:, ?\?)+\)")
_KEYWORDS_AFTER_FROM: Final = frozenset(
    {"WHERE", "GROUP", "ORDER", "LIMIT", "OFFSET", "HAVING", "FOR", "WINDOW", "UNION", "EXCEPT", "INTERSECT",
     "RETURNING", "SET", "VALUES", "USING", "ON", "FETCH", "INTO", "LOCK", "PROCEDURE"}
)  # fmt: skip
# keywords a parenthesis after stays apart from ("IN (?)"); after other words it is a call ("count(*)")
_SPACED: Final = frozenset(
    {
        "IN",
        "AS",
        "VALUES",
        "VALUE",
        "ON",
        "AND",
        "OR",
        "NOT",
        "EXISTS",
        "FROM",
        "JOIN",
        "WHERE",
        "USING",
        "INTO",
        "SELECT",
        "ANY",
        "ALL",
        "SOME",
        "TABLE",
        "SET",
        "RETURNING",
        "WITH",
    }
)
_JOINS: Final = frozenset({"JOIN", "INNER", "LEFT", "RIGHT", "FULL", "CROSS", "NATURAL", "STRAIGHT_JOIN", "LATERAL"})


@dataclass(frozen=True, slots=True)
class SqlSummary:
    operation: str  # db.operation.name: the statement's first keyword, upper case ("SELECT"), or ""
    collection: str  # db.collection.name: the one table the statement names, or "" (none, several, unsure)
    text: str  # db.query.text: sanitized, at most MAX_TEXT characters
    summary: str  # db.query.summary: "{operation} {collection}", or the operation alone

    @property
    def empty(self) -> bool:
        return not self.text


EMPTY: Final = SqlSummary("", "", "", "")


def _comment_end(text: str, pos: int) -> int:
    """End of a PostgreSQL block comment at ``pos``: they nest (the regex alone would stop at the
    first ``*/`` and let the rest of an outer comment through as words)."""
    depth = 0
    i = pos
    while i < len(text) - 1:
        two = text[i : i + 2]
        if two == "/*":
            depth += 1
            i += 2
        elif two == "*/":
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return len(text)


def _tokens(text: str, dialect: str) -> list[tuple[str, str]]:
    """(kind, token) pairs: w word, q quoted identifier, ? literal, p parameter, o other."""
    out: list[tuple[str, str]] = []
    text = text[:MAX_INPUT]
    rx = _DIALECTS[dialect]
    pos = 0
    while True:
        m = rx.search(text, pos)
        if m is None:
            return out
        kind = m.lastgroup or "o"
        pos = m.end()
        if kind == "c":
            if dialect == "postgresql" and m.group().startswith("/*"):
                pos = _comment_end(text, m.start())
            continue
        if kind in ("s", "n", "d", "tag"):
            out.append(("?", "?"))
        else:
            out.append((kind, m.group()))


def _render(tokens: list[tuple[str, str]]) -> str:
    """Tokens joined by single spaces, none inside parentheses or before , . ;"""
    parts: list[str] = []
    size = 0
    prev_kind, prev = "", ""
    for kind, tok in tokens:
        call = tok == "(" and prev_kind in ("w", "q") and prev.upper() not in _SPACED
        glue = tok in (",", ")", ".", ";") or prev in ("(", ".") or call
        if parts and not glue:
            parts.append(" ")
        parts.append(tok)
        size += len(tok) + 1
        prev_kind, prev = kind, tok
        if size > MAX_TEXT + 64:
            break
    return _LIST.sub("(?)", "".join(parts))[:MAX_TEXT]


def _name(kind: str, tok: str) -> str:
    if kind == "q":
        return tok[1:-1] if len(tok) >= 2 and tok[-1] == tok[0] else ""
    return tok


def _qualified(tokens: list[tuple[str, str]], i: int) -> tuple[str, int]:
    """A possibly schema-qualified name starting at tokens[i]: (name, index after it) or ("", i)."""
    parts: list[str] = []
    while i < len(tokens) and tokens[i][0] in ("w", "q"):
        parts.append(_name(*tokens[i]))
        i += 1
        if i < len(tokens) and tokens[i][1] == ".":
            i += 1
            continue
        break
    name = ".".join(parts)
    return (name, i) if name and "" not in parts and len(name) <= MAX_NAME else ("", i)


def _skip_words(tokens: list[tuple[str, str]], i: int, words: tuple[str, ...]) -> int:
    while i < len(tokens) and tokens[i][0] == "w" and tokens[i][1].upper() in words:
        i += 1
    return i


def _single_table_after(tokens: list[tuple[str, str]], i: int) -> str:
    """The table at tokens[i] if it is the only one the clause names (no list, join or subquery)."""
    name, j = _qualified(tokens, i)
    if not name:
        return ""
    # an alias may follow ("FROM users u", "FROM users AS u")
    if j < len(tokens) and tokens[j][0] == "w" and tokens[j][1].upper() == "AS":
        j += 1
    if j < len(tokens) and tokens[j][0] in ("w", "q") and tokens[j][1].upper() not in _KEYWORDS_AFTER_FROM | _JOINS:
        j += 1
    if j < len(tokens) and (tokens[j][1] == "," or tokens[j][1].upper() in _JOINS):
        return ""
    return name


def _collection(op: str, tokens: list[tuple[str, str]]) -> str:
    words = [(i, t.upper()) for i, (k, t) in enumerate(tokens) if k == "w"]
    if op in ("SELECT", "DELETE"):
        depth = 0
        found = ""
        for i, (kind, tok) in enumerate(tokens):
            if kind == "o" and tok == "(":
                depth += 1
            elif kind == "o" and tok == ")":
                depth -= 1
            elif depth == 0 and kind == "w" and tok.upper() == "FROM":
                if found:
                    return ""  # a second FROM at top level (UNION ...): more than one table
                found = _single_table_after(tokens, i + 1) or "\0"
            elif depth > 0 and kind == "w" and tok.upper() == "FROM" and op == "SELECT":
                return ""  # a subquery names another table
        return "" if found == "\0" else found
    first = words[0][0] if words else 0
    if op == "INSERT" or op == "REPLACE":
        i = _skip_words(tokens, first + 1, ("LOW_PRIORITY", "DELAYED", "HIGH_PRIORITY", "IGNORE", "INTO"))
        return _qualified(tokens, i)[0]
    if op == "UPDATE":
        i = _skip_words(tokens, first + 1, ("LOW_PRIORITY", "IGNORE", "ONLY"))
        return _single_table_after(tokens, i)
    if op in ("COPY", "TRUNCATE", "LOCK"):
        i = _skip_words(tokens, first + 1, ("TABLE", "TABLES", "ONLY"))
        return _single_table_after(tokens, i)
    if op in ("CREATE", "DROP", "ALTER") and len(words) >= 2 and words[1][1] == "TABLE":
        i = _skip_words(tokens, words[1][0] + 1, ("IF", "NOT", "EXISTS", "ONLY"))
        return _single_table_after(tokens, i)
    return ""


def _operation(tokens: list[tuple[str, str]]) -> str:
    for kind, tok in tokens:
        if kind == "w":
            op = tok.upper()
            if op != "WITH":
                return op
            break
        if tok != "(":
            return ""
    # WITH ...: the statement is the first top-level keyword after the CTEs
    depth = 0
    for kind, tok in tokens[1:]:
        if tok == "(":
            depth += 1
        elif tok == ")":
            depth -= 1
        elif depth == 0 and kind == "w" and tok.upper() in ("SELECT", "INSERT", "UPDATE", "DELETE", "MERGE"):
            return tok.upper()
    return "WITH"


def sanitize(text: str, dialect: str = "postgresql") -> SqlSummary:
    """``text`` (possibly cut short) -> a SqlSummary with no literal left in it."""
    tokens = _tokens(text, dialect)
    if not tokens:
        return EMPTY
    # several statements in one query: the first one names the operation, the batch has no table
    semi = next((i for i, (k, t) in enumerate(tokens) if k == "o" and t == ";"), len(tokens))
    first = tokens[:semi]
    more = any(True for _ in tokens[semi + 1 :])
    op = _operation(first)
    if len(op) > 32:
        op = ""
    coll = "" if more or not op else _collection(op, first)
    summary = f"{op} {coll}" if coll else op
    return SqlSummary(op, coll, _render(tokens), summary)
