"""SQL literals and the database client command lines, for both database
families the tiers drive (PostgreSQL for the XMPP service, MySQL/Galera for the
mail cluster). Statements that carry values go to the client on standard
input; a statement on the command line is quoted with ``shell.q``."""

from __future__ import annotations

import hashlib

from .shell import q

# --- PostgreSQL ----------------------------------------------------------------------


def pg_literal(value: str) -> str:
    """A PostgreSQL string literal (standard_conforming_strings is on since 9.1)."""
    if "\0" in value:
        raise ValueError("a NUL character cannot be in a PostgreSQL string")
    return "'" + value.replace("'", "''") + "'"


def pg_ident(name: str) -> str:
    """A quoted PostgreSQL identifier."""
    return '"' + name.replace('"', '""') + '"'


PSQL = "runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1"


def psql(db: str = "postgres") -> str:
    """The local psql as the postgres superuser (peer authentication), unaligned
    tuples only; the statement follows with ``-c`` (see ``psql_c``) or on stdin (``-f -``)."""
    return f"{PSQL} -d {q(db)}"


def psql_c(query: str, db: str = "postgres") -> str:
    """psql running one ``query`` given on the command line (quoted)."""
    return f"{psql(db)} -c {q(query)}"


# --- MySQL / MariaDB / Percona ----------------------------------------------------------


def my_literal(value: str) -> str:
    """A MySQL string literal (backslash escapes on, the servers' default)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'").replace("\0", "\\0") + "'"


def my_ident(name: str) -> str:
    """A quoted MySQL identifier."""
    return "`" + name.replace("`", "``") + "`"


def mysql(*, defaults_file: str | None = None, host: str | None = None, port: int | None = None,
          database: str | None = None, timeout: int = 10) -> str:
    """The mysql client in batch mode (tab-separated, no column names). Without
    ``defaults_file`` it is root over the local socket (socket authentication);
    the statements come on stdin, or with ``mysql_e``."""
    words = ["mysql"]
    if defaults_file:
        words.append(f"--defaults-extra-file={q(defaults_file)}")
    if host:
        words.append(f"-h {q(host)}")
    if port:
        words.append(f"-P {int(port)}")
    words += [f"--connect-timeout={int(timeout)}", "-NB"]
    if database:
        words.append(q(database))
    return " ".join(words)


def mysql_e(statement: str, **kw) -> str:
    """The mysql client running ``statement`` given on the command line (quoted)."""
    return f"{mysql(**kw)} -e {q(statement)}"


def mysql_native_hash(password: str) -> str:
    """mysql_native_password's stored form: '*' + upper hex SHA1(SHA1(password))."""
    return "*" + hashlib.sha1(hashlib.sha1(password.encode()).digest()).hexdigest().upper()
