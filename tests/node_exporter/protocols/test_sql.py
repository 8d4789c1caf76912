"""The SQL sanitizer: every literal becomes ?, comments go, names and operations are picked out; fuzzed
with secret markers that must never come out."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node_exporter.protocols.sql import MAX_TEXT, sanitize

SECRET = "s3cr3tMARK"


@pytest.mark.parametrize(
    ("text", "dialect", "op", "coll", "out"),
    [
        ("SELECT * FROM users WHERE name = 'x' AND id IN (1, 2, 3)", "postgresql", "SELECT", "users",
         "SELECT * FROM users WHERE name = ? AND id IN (?)"),
        ("select abalance from pgbench_accounts where aid = $1", "postgresql", "SELECT", "pgbench_accounts",
         "select abalance from pgbench_accounts where aid = $1"),
        ("INSERT INTO public.t (a, b) VALUES ('x', 3.5e3), (E'it\\'s', $$dollar$$)", "postgresql", "INSERT",
         "public.t", "INSERT INTO public.t(a, b) VALUES (?), (?)"),
        ('UPDATE "Mixed" SET x = -1 WHERE y = 0x1f', "postgresql", "UPDATE", "Mixed",
         'UPDATE "Mixed" SET x = - ? WHERE y = ?'),
        ("DELETE FROM t WHERE k = $tag$ a $ b $tag$", "postgresql", "DELETE", "t", "DELETE FROM t WHERE k = ?"),
        ("WITH c AS (SELECT 1) SELECT * FROM c JOIN d ON true", "postgresql", "SELECT", "",
         "WITH c AS (SELECT ?) SELECT * FROM c JOIN d ON true"),
        ("SELECT a FROM t1, t2", "postgresql", "SELECT", "", "SELECT a FROM t1, t2"),
        ("SELECT a FROM (SELECT b FROM t) s", "postgresql", "SELECT", "", "SELECT a FROM (SELECT b FROM t) s"),
        ("BEGIN; SELECT 1 FROM t", "postgresql", "BEGIN", "", "BEGIN; SELECT ? FROM t"),
        ("COPY pgbench_accounts FROM STDIN", "postgresql", "COPY", "pgbench_accounts",
         "COPY pgbench_accounts FROM STDIN"),
        ("CREATE TABLE IF NOT EXISTS kv (k text)", "postgresql", "CREATE", "kv",
         "CREATE TABLE IF NOT EXISTS kv(k text)"),
        ("  -- lead\n/* x */ SELECT count(*) FROM t u", "postgresql", "SELECT", "t", "SELECT count(*) FROM t u"),
        ("SELECT `a` FROM `db`.`t` WHERE x = \"dq\" # tail", "mysql", "SELECT", "db.t",
         "SELECT `a` FROM `db`.`t` WHERE x = ?"),
        ("select @@version_comment limit 1", "mysql", "SELECT", "", "select @@version_comment limit ?"),
        ("INSERT IGNORE INTO kv VALUES (_utf8mb4'x', X'ff')", "mysql", "INSERT", "kv",
         "INSERT IGNORE INTO kv VALUES (?)"),
        ("", "postgresql", "", "", ""),
    ],
)  # fmt: skip
def test_sanitize(text: str, dialect: str, op: str, coll: str, out: str) -> None:
    s = sanitize(text, dialect)
    assert (s.operation, s.collection, s.text) == (op, coll, out)
    assert s.summary == (f"{op} {coll}" if coll else op)


@pytest.mark.parametrize(
    "text",
    [
        f"SELECT '{SECRET}",  # cut short by the capture: the literal runs to the end
        f"SELECT $q$ {SECRET}",
        f"SELECT 1 /* {SECRET}",
        f"/* outer /* inner */ {SECRET} */ SELECT 1",  # PostgreSQL comments nest
        f"SELECT E'\\' {SECRET}'",
        f"SELECT 'it''s {SECRET}'",
        f"SELECT 1 -- {SECRET}",
        f"SELECT U&'{SECRET}'",
    ],
)
def test_no_literal_survives(text: str) -> None:
    assert SECRET not in sanitize(text, "postgresql").text


@pytest.mark.parametrize(
    "text",
    [f'SELECT "{SECRET}"', f"SELECT '\\' {SECRET}'", f"SELECT 1 # {SECRET}", f"SELECT x'{SECRET}", f"SELECT '{SECRET}"],
)
def test_no_literal_survives_mysql(text: str) -> None:
    assert SECRET not in sanitize(text, "mysql").text


def test_bounded() -> None:
    s = sanitize("SELECT " + ", ".join(f"col{i}" for i in range(5000)) + " FROM t")
    assert 0 < len(s.text) <= MAX_TEXT
    assert sanitize("SELECT * FROM " + "x" * 500).collection == ""  # a name past MAX_NAME is not reported


_PIECES = ["SELECT", "FROM", "WHERE", "t", "a.b", "(", ")", ",", "=", "IN", ";", " ", "\n", "$1", "--", "/*", "*/",
           "'", '"', "`", "$$", "$x$", "E", "\\", "#", "0x", "1.5e", "-", "@@v"]  # fmt: skip
# pieces that end no literal or comment: the marker's literal starts where the generator put it
_SAFE = [p for p in _PIECES if not set(p) & set("'\"`$#-/*\\")]
_LITERALS = ["'{}'", "E'{}'", "$${}$$", "$k${}$k$", "'{}", "$${}", "/* {} */", "-- {}\n", "'a''{}'", "/* /* */ {} */"]
_MYSQL_LITERALS = ["'{}'", '"{}"', "'\\'{}'", "# {}\n", "/* {} */", "-- {}\n", "x'{}'", "_utf8mb4'{}'", "'{}"]


@pytest.mark.parametrize("dialect", ["postgresql", "mysql"])
def test_fuzz_secrets_never_leave(dialect: str) -> None:
    """10^5 random statements per dialect: SQL fragments around literals holding the secret marker
    (its pieces never a keyword or name of their own); the marker must never come out."""
    rng = random.Random(14)
    forms = _LITERALS if dialect == "postgresql" else _MYSQL_LITERALS
    for _ in range(100_000):
        parts = [rng.choice(_SAFE) for _ in range(rng.randrange(0, 8))]
        parts.append(rng.choice(forms).format(SECRET))
        parts += [rng.choice(_PIECES) for _ in range(rng.randrange(0, 8))]
        s = sanitize(" ".join(parts), dialect)
        assert SECRET not in s.text and SECRET not in s.collection and SECRET not in s.operation, parts


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300), st.sampled_from(["postgresql", "mysql"]))
def test_never_raises(text: str, dialect: str) -> None:
    s = sanitize(text, dialect)
    assert len(s.text) <= MAX_TEXT
