"""SQL literals and the database client command lines, for both database
families the tiers drive (PostgreSQL for the XMPP service, MySQL/Galera for the
mail cluster). Statements that carry values go to the client on standard
input; a statement on the command line is quoted with ``shell.q``."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
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


# Every role of the cluster, name -> [can log in, replication, stored password], as one JSON object.
ROLES_QUERY = ("SELECT coalesce(json_object_agg(rolname, json_build_array(rolcanlogin, rolreplication, rolpassword)), "
               "'{}') FROM pg_authid")


def pg_roles(h) -> dict[str, list]:
    """The roles on the host ``h`` (a HostSession), read in one query once per run (again
    after ``ensure_role`` changed one); empty when PostgreSQL does not answer (yet)."""
    def read() -> dict[str, list]:
        r = h.probe(psql_c(ROLES_QUERY))
        try:
            roles = json.loads(r.stdout) if r.ok else {}
        except ValueError:
            return {}
        return roles if isinstance(roles, dict) else {}
    return h.memo("pg_roles", read)


def ensure_role(h, name: str, password: str, attributes: str, label: str = "role") -> None:
    """A PostgreSQL role on the host ``h`` (a HostSession) with ``attributes`` (LOGIN,
    REPLICATION) and the SCRAM verifier of ``password``: created, or altered when its
    password or those attributes differ; left alone otherwise. The verifier is
    computed here: the clear password never reaches the server or its logs, and psql
    reads the statement from stdin, not from the command line."""
    have = pg_roles(h).get(name)
    if (have is not None and have[:2] == [True, "REPLICATION" in attributes]
            and scram_matches(have[2] if len(have) > 2 else None, password)):
        h.ok(f"{label} {name}: {attributes.lower()}, password is the site's (SCRAM)")
        return
    verb = "ALTER" if have is not None else "CREATE"
    statement = f"{verb} ROLE {pg_ident(name)} WITH {attributes} PASSWORD {pg_literal(scram_verifier(password))};\n"
    h.sh(f"{psql()} -f -", stdin=statement,
         message=f"{verb.lower()} {label} {name} ({attributes.lower()}, SCRAM password from the site's secrets)")
    h.forget("pg_roles")
