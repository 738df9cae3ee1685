"""Mail client for the lab tests, run inside a lab host's network namespace
(`ip netns exec NS python mail_client.py`). Reads a JSON spec on stdin, prints
one JSON line of results.

- submit: SMTP submission (587) with STARTTLS (certificate verified against the
  given CA, for the address connected to) and AUTH as the sender, to the recipient;
- fetch: IMAP with STARTTLS (143) and IMAPS (993), both verified, as the
  recipient: waits until the message (by its unique subject) is in INBOX;
- relay: unauthenticated SMTP on 25 and 587 to a foreign domain; the replies;
- http: HTTPS GET of the given paths (verified); their status codes;
- submit/fetch with "message_id": the message carries that Message-ID and is
  looked up by it (HEADER Message-ID) instead of by its subject;
- stream: submits numbered messages (587, STARTTLS, AUTH) one after another for
  the given seconds, reconnecting after any failure; prints the numbers whose
  DATA the server acknowledged with 250 (and how many attempts failed);
- list: the subjects of every message in INBOX (IMAPS).
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
    if s.get("message_id"):
        msg["Message-ID"] = s["message_id"]
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
            if f.get("message_id"):
                typ, data = imap.search(None, "HEADER", "Message-ID", f'"{f["message_id"]}"')
            else:
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

if "stream" in spec:
    st = spec["stream"]
    acked, failures, n = [], 0, 0
    end = time.monotonic() + st["seconds"]
    smtp = None
    while time.monotonic() < end:
        n += 1
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = st["from"], st["to"], f"{st['prefix']} {n}"
        msg.set_content(f"message {n}\n")
        try:
            if smtp is None:
                smtp = smtplib.SMTP(host, 587, timeout=timeout)
                smtp.ehlo("client.lab.test")
                smtp.starttls(context=ctx)
                smtp.ehlo("client.lab.test")
                smtp.login(st["from"], st["password"])
            if not smtp.send_message(msg):  # returns only after 250 to DATA; raises otherwise
                acked.append(n)
        except (OSError, smtplib.SMTPException):
            failures += 1
            smtp = None
            time.sleep(0.5)
    if smtp is not None:
        try:
            smtp.quit()
        except (OSError, smtplib.SMTPException):
            pass
    out["acked"], out["failures"], out["attempts"] = acked, failures, n

if "list" in spec:
    li = spec["list"]
    imap = imaplib.IMAP4_SSL(host, 993, ssl_context=ctx, timeout=timeout)
    imap.login(li["user"], li["password"])
    imap.select("INBOX", readonly=True)
    typ, data = imap.search(None, "ALL")
    subjects = []
    for num in data[0].split():
        typ, hdr = imap.fetch(num, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        subjects.append(hdr[0][1].decode(errors="replace").split(":", 1)[1].strip())
    imap.logout()
    out["subjects"] = subjects

print(json.dumps(out))
