"""Mail client for the lab tests, run inside a lab host's network namespace
(`ip netns exec NS python mail_client.py`). Reads a JSON spec on stdin, prints
one JSON line of results.

- submit: SMTP submission (587) with STARTTLS (certificate verified against the
  given CA, for the address connected to) and AUTH as the sender, to the recipient;
- fetch: IMAP with STARTTLS (143) and IMAPS (993), both verified, as the
  recipient: waits until the message (by its unique subject) is in INBOX;
- relay: unauthenticated SMTP on 25 and 587 to a foreign domain; the replies;
- http: HTTPS GET of the given paths (verified); their status codes.
"""

import imaplib
import json
import smtplib
import ssl
import sys
import time
import urllib.error
import urllib.request
from email.message import EmailMessage

spec = json.load(sys.stdin)
host, timeout = spec["host"], spec.get("timeout", 20)
ctx = ssl.create_default_context(cafile=spec["ca"])
out = {}

if "submit" in spec:
    s = spec["submit"]
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = s["from"], s["to"], s["subject"]
    msg.set_content("sent by the hastack lab test\n")
    t0 = time.monotonic()
    with smtplib.SMTP(host, 587, timeout=timeout) as smtp:
        smtp.ehlo("client.lab.test")
        out["auth_before_tls"] = smtp.has_extn("auth")
        smtp.starttls(context=ctx)
        smtp.ehlo("client.lab.test")
        out["tls_version"] = smtp.sock.version()
        smtp.login(s["from"], s["password"])
        refused = smtp.send_message(msg)
    out["submitted"] = not refused
    out["submit_seconds"] = round(time.monotonic() - t0, 3)

if "fetch" in spec:
    f = spec["fetch"]
    found = {}
    deadline = time.monotonic() + f.get("wait", 30)
    for name, port in (("imap_starttls", 143), ("imaps", 993)):
        if name == "imaps":
            imap = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=timeout)
        else:
            imap = imaplib.IMAP4(host, port, timeout=timeout)
            imap.starttls(ssl_context=ctx)
        imap.login(f["user"], f["password"])
        while True:
            imap.select("INBOX")
            typ, data = imap.search(None, "SUBJECT", f'"{f["subject"]}"')
            if data and data[0].split():
                found[name] = len(data[0].split())
                break
            if time.monotonic() > deadline:
                found[name] = 0
                break
            time.sleep(0.5)
        imap.logout()
    out["found"] = found

if "relay" in spec:
    r = spec["relay"]
    replies = {}
    for port in (25, 587):
        with smtplib.SMTP(host, port, timeout=timeout) as smtp:
            smtp.ehlo("outsider.example.com")
            if port == 587:
                smtp.starttls(context=ctx)
                smtp.ehlo("outsider.example.com")
            code, _ = smtp.mail(r["from"])
            rcode, rtext = smtp.rcpt(r["to"])
            replies[str(port)] = [code, rcode, rtext.decode(errors="replace")]
            smtp.rset()
    out["relay"] = replies

if "http" in spec:
    codes = {}
    for path in spec["http"]:
        try:
            with urllib.request.urlopen(f"https://{host}{path}", context=ctx, timeout=timeout) as r:
                codes[path] = r.status
        except urllib.error.HTTPError as e:
            codes[path] = e.code
    out["http"] = codes

print(json.dumps(out))
