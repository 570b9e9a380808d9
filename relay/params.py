"""ESMTP parameters of MAIL and RCPT that relay implements itself.

aiosmtpd checks SIZE, BODY and SMTPUTF8 and refuses any other parameter
(555). The parameters in :data:`MAIL_PARAMETERS` and
:data:`RCPT_PARAMETERS` are taken off the command before it does, checked
here and kept with the envelope: the DSN extension's RET and ENVID (MAIL),
NOTIFY and ORCPT (RCPT) of RFC 3461, and REQUIRETLS (MAIL, RFC 8689). Each
table maps a keyword to the function that checks its value and returns it
as stored; an extension adds its keyword to the table, and its EHLO
keyword to :func:`ehlo_keywords`. The same parameters go to a next hop that
offers them (:func:`mail_options`, :func:`rcpt_options`). Pure rules, no I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from relay import errors
from relay.addresses import AddressError, check_mailbox
from relay.envelope import Envelope
from relay.errors import Reply

#: Checks one parameter's value (None for a keyword without "="); returns
#: the value as stored, raises ParameterError.
Check = Callable[[str | None], str]


class ParameterError(ValueError):
    """A parameter relay knows is malformed, repeated or out of place: ``reply``
    (501 5.5.4 unless the parameter says otherwise)."""

    def __init__(self, message: str, reply: Reply = errors.BAD_PARAMETER) -> None:
        super().__init__(message)
        self.reply = reply


# --- xtext (RFC 3461 section 4) -------------------------------------------------


def xtext_decode(text: str) -> str:
    """``xtext = *( xchar / hexchar )``: "+" and two upper-case hex digits
    stand for one octet; every other character is printable ASCII (33-126)
    other than "+" and "=". Raises ParameterError."""
    out: list[str] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "+":
            digits = text[i + 1 : i + 3]
            if len(digits) != 2 or any(d not in "0123456789ABCDEF" for d in digits):
                raise ParameterError(f"bad xtext escape in {text!r}")
            out.append(chr(int(digits, 16)))
            i += 3
            continue
        if not 33 <= ord(ch) <= 126 or ch == "=":
            raise ParameterError(f"bad xtext character in {text!r}")
        out.append(ch)
        i += 1
    return "".join(out)


def xtext_encode(text: str) -> str:
    """The xtext form of ``text`` (printable ASCII; "+", "=" and others as "+XX")."""
    return "".join(
        ch if 33 <= ord(ch) <= 126 and ch not in "+=" else f"+{ord(ch):02X}" for ch in text
    )


def _printable(text: str) -> bool:
    return all(32 <= ord(ch) <= 126 for ch in text)


# --- MAIL: RET, ENVID ------------------------------------------------------------


def _ret(value: str | None) -> str:
    # RFC 3461 section 4.3: RET=FULL / RET=HDRS, case-insensitive.
    if value is None or value.upper() not in ("FULL", "HDRS"):
        raise ParameterError("RET must be FULL or HDRS")
    return value.upper()


def _envid(value: str | None) -> str:
    # RFC 3461 section 4.4: xtext, at most 100 characters, printable ASCII decoded.
    if not value:
        raise ParameterError("ENVID needs a value")
    envid = xtext_decode(value)
    if len(envid) > 100 or not _printable(envid):
        raise ParameterError("ENVID too long or not printable")
    return envid


# --- MAIL: REQUIRETLS ---------------------------------------------------------------


def _requiretls(value: str | None) -> str:
    # RFC 8689 section 2: a keyword without a value; over TLS only (TLS_ONLY).
    if value is not None:
        raise ParameterError("REQUIRETLS takes no value")
    return "yes"


#: Parameters a session may give only once it runs TLS (RFC 8689 section 2:
#: REQUIRETLS is advertised after STARTTLS only).
TLS_ONLY: dict[str, Reply] = {"REQUIRETLS": errors.REQUIRETLS_NEEDS_TLS}


# --- RCPT: NOTIFY, ORCPT ------------------------------------------------------------

#: NOTIFY's values other than NEVER (RFC 3461 section 4.1).
NOTIFY_WHEN = ("SUCCESS", "FAILURE", "DELAY")


def _notify(value: str | None) -> str:
    # "NEVER" alone, or a comma list of SUCCESS, FAILURE, DELAY (no repeats).
    if not value:
        raise ParameterError("NOTIFY needs a value")
    items = [item.upper() for item in value.split(",")]
    if items == ["NEVER"]:
        return "NEVER"
    if len(set(items)) != len(items) or not all(item in NOTIFY_WHEN for item in items):
        raise ParameterError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return ",".join(items)


def _orcpt(value: str | None) -> str:
    # RFC 3461 section 4.2: addr-type ";" xtext, at most 500 characters;
    # stored decoded as "addr-type;address". An rfc822 address must be one.
    if not value or len(value) > 500:
        raise ParameterError("ORCPT needs addr-type;address (at most 500 characters)")
    addr_type, semi, encoded = value.partition(";")
    atom = addr_type.replace("-", "").replace("_", "")
    if not semi or not atom.isascii() or not atom.isalnum():
        raise ParameterError("ORCPT needs addr-type;address")
    address = xtext_decode(encoded)
    if not address or not _printable(address):
        raise ParameterError("ORCPT address empty or not printable")
    if addr_type.lower() == "rfc822":
        try:
            check_mailbox(address)
        except AddressError as exc:
            raise ParameterError(f"ORCPT is not an address: {exc}") from exc
        return f"rfc822;{address}"
    return f"{addr_type};{address}"


def orcpt_xtext(orcpt: str) -> str:
    """A stored ORCPT (``addr-type;address``) as the parameter's value."""
    addr_type, _, address = orcpt.partition(";")
    return f"{addr_type};{xtext_encode(address)}"


#: MAIL FROM parameters relay implements itself (keyword -> check).
MAIL_PARAMETERS: dict[str, Check] = {"RET": _ret, "ENVID": _envid, "REQUIRETLS": _requiretls}
#: RCPT TO parameters relay implements itself (keyword -> check).
RCPT_PARAMETERS: dict[str, Check] = {"NOTIFY": _notify, "ORCPT": _orcpt}


def ehlo_keywords(tls: bool) -> list[str]:
    """The EHLO keywords of the parameters in the tables, in this session's state:
    DSN (RFC 3461), and REQUIRETLS on a TLS session only (RFC 8689 section 2)."""
    return ["DSN", "REQUIRETLS"] if tls else ["DSN"]


def take_parameters(
    text: str, table: Mapping[str, Check], tls: bool = False
) -> tuple[dict[str, str], str]:
    """Split a command's parameters (after the path) into those in ``table``,
    checked (keyword -> value as stored), and the rest as written (for
    aiosmtpd). Keywords are case-insensitive, values keep their case (xtext
    is). Raises ParameterError for a bad value, a keyword given twice
    (RFC 3461 section 4: each at most once), or one of :data:`TLS_ONLY`
    without ``tls``.
    """
    taken: dict[str, str] = {}
    rest: list[str] = []
    for word in text.split():
        keyword, eq, value = word.partition("=")
        check = table.get(keyword.upper())
        if check is None:
            rest.append(word)
            continue
        if keyword.upper() in taken:
            raise ParameterError(f"{keyword.upper()} given twice")
        taken[keyword.upper()] = check(value if eq else None)
        if not tls and keyword.upper() in TLS_ONLY:  # a bad value is the first problem
            raise ParameterError(f"{keyword.upper()} without TLS", TLS_ONLY[keyword.upper()])
    return taken, " ".join(rest)


# --- one session's parameters ----------------------------------------------------


@dataclass(slots=True)
class SessionParameters:
    """What relay took off one SMTP session's MAIL and RCPT commands.

    The server sets ``table`` (MAIL_PARAMETERS or RCPT_PARAMETERS) and
    ``tls`` as a command starts and calls :meth:`take` with the command's
    parameters; its hook refuses the command with ``reply`` if ``error`` is
    set, else records them.
    """

    table: Mapping[str, Check] = field(default_factory=dict)
    #: The session runs TLS (for :data:`TLS_ONLY`).
    tls: bool = False
    #: The command under way: what it gave, or why it is refused ("" if not).
    taken: dict[str, str] = field(default_factory=dict)
    error: str = ""
    reply: Reply = errors.BAD_PARAMETER
    #: The transaction's MAIL parameters and each recipient's RCPT parameters.
    mail: dict[str, str] = field(default_factory=dict)
    rcpt: dict[str, dict[str, str]] = field(default_factory=dict)

    def take(self, params: str) -> str:
        """Take the command's parameters in ``table`` off ``params``; the rest."""
        table, self.table = self.table, {}
        self.taken, self.error = {}, ""
        try:
            self.taken, rest = take_parameters(params, table, self.tls)
        except ParameterError as exc:
            self.error, self.reply = str(exc), exc.reply
            rest = " ".join(w for w in params.split() if w.partition("=")[0].upper() not in table)
        return rest

    def mail_accepted(self) -> None:
        self.mail, self.rcpt = self.taken, {}

    def rcpt_accepted(self, address: str) -> None:
        self.rcpt[address] = self.taken


# --- outbound: the parameters given to the next hop --------------------------------


def mail_options(envelope: Envelope, size: int, offers: Callable[[str], bool]) -> list[str]:
    """ESMTP MAIL parameters the envelope asks for and the server ``offers``
    (its EHLO keywords, lower-case). Raises PermanentFailure when a
    non-ASCII envelope meets a server without SMTPUTF8."""
    options: list[str] = []
    if offers("size"):
        options.append(f"SIZE={size}")  # RFC 1870
    if envelope.body_8bit and offers("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if envelope.smtputf8:
        if offers("smtputf8"):
            options.append("SMTPUTF8")  # RFC 6531
        elif not _ascii_envelope(envelope):
            # RFC 6531 section 3.4: a non-ASCII address cannot be downgraded.
            raise errors.PermanentFailure("next hop lacks SMTPUTF8", errors.SMTPUTF8_UNSUPPORTED)
    if offers("dsn"):
        # RFC 3461 section 4: passed on as the client gave them.
        if envelope.ret:
            options.append(f"RET={envelope.ret}")
        if envelope.envid:
            options.append(f"ENVID={xtext_encode(envelope.envid)}")
    if envelope.requiretls:
        options.append("REQUIRETLS")  # RFC 8689 section 2; the hop offered it (relay.session)
    return options


def rcpt_options(envelope: Envelope, address: str, dsn: bool) -> list[str]:
    """RCPT parameters for ``address``: its NOTIFY and ORCPT, to a next hop offering ``dsn``."""
    rcpt = next((r for r in envelope.recipients if r.address == address), None)
    if not dsn or rcpt is None:
        return []
    options = [f"NOTIFY={rcpt.notify}"] if rcpt.notify else []
    if rcpt.orcpt:
        options.append(f"ORCPT={orcpt_xtext(rcpt.orcpt)}")
    return options


def _ascii_envelope(envelope: Envelope) -> bool:
    addresses = [envelope.mail_from, *(r.address for r in envelope.recipients)]
    return all(a.isascii() for a in addresses)
