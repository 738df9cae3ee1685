"""SQL literals and the database client command lines, for both database
families the tiers drive (PostgreSQL for the XMPP service, MySQL/Galera for the
mail cluster). Statements that carry values go to the client on standard
input; a statement on the command line is quoted with ``shell.q``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re

from .errors import UserError
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


SCRAM_ITERATIONS = 4096


# --- SCRAM verifiers (RFC 5802 / 7677, as PostgreSQL stores them) -------------------


def scram_verifier(password: str, *, salt: bytes | None = None, iterations: int = SCRAM_ITERATIONS) -> str:
    """The `SCRAM-SHA-256$iter:salt$StoredKey:ServerKey` PostgreSQL keeps for ``password``."""
    if not password:
        raise UserError("an empty password has no SCRAM verifier")
    salt = salt if salt is not None else os.urandom(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", "sha256").digest()
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def scram_matches(verifier: str | None, password: str) -> bool:
    """Whether a stored verifier is the one of ``password`` (False for md5/none/garbage)."""
    m = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+):([A-Za-z0-9+/=]+)",
                     (verifier or "").strip())
    if not m:
        return False
    try:
        salt = base64.b64decode(m[2], validate=True)
    except ValueError:
        return False
    return hmac.compare_digest(scram_verifier(password, salt=salt, iterations=int(m[1])), m[0])


def ensure_role(h, name: str, password: str, attributes: str, label: str = "role") -> None:
    """A PostgreSQL role on the host ``h`` (a HostSession) with ``attributes`` (LOGIN,
    REPLICATION) and the SCRAM verifier of ``password``: created, or altered when its
    password or those attributes differ; left alone otherwise. The verifier is
    computed here: the clear password never reaches the server or its logs, and psql
    reads the statement from stdin, not from the command line."""
    stored = h.probe(psql_c(f"SELECT rolpassword FROM pg_authid WHERE rolname = {pg_literal(name)}"))
    row = h.probe(psql_c(f"SELECT count(*) FROM pg_roles WHERE rolname = {pg_literal(name)}")).stdout.strip()
    verb = "ALTER" if row == "1" else "CREATE"
    wanted_attrs = h.probe(psql_c(
        f"SELECT rolcanlogin::text || rolreplication::text FROM pg_roles WHERE rolname = {pg_literal(name)}"))
    want_flags = "true" + ("true" if "REPLICATION" in attributes else "false")
    if verb == "ALTER" and scram_matches(stored.stdout, password) and wanted_attrs.stdout.strip() == want_flags:
        h.ok(f"{label} {name}: {attributes.lower()}, password is the site's (SCRAM)")
        return
    statement = f"{verb} ROLE {pg_ident(name)} WITH {attributes} PASSWORD {pg_literal(scram_verifier(password))};\n"
    h.sh(f"{psql()} -f -", stdin=statement,
         message=f"{verb.lower()} {label} {name} ({attributes.lower()}, SCRAM password from the site's secrets)")
