"""The ESMTP MAIL FROM parameters relay implements itself, one table (RFC 5321 section 4.1.2).

aiosmtpd handles SIZE, BODY and SMTPUTF8 and refuses every other parameter
with 555 unless it is named in :data:`MAIL_PARAMETERS`; relay.inbound
lets those through and :func:`parse_mail` reads them into
:class:`MailParameters`. Each parameter is one row: its name and a
function that reads its value into the result or refuses it. Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from relay import errors
from relay.errors import Reply


@dataclass(frozen=True, slots=True)
class MailParameters:
    """What the MAIL FROM parameters ask of the message's delivery."""

    #: REQUIRETLS (RFC 8689 section 2): only verified TLS, every hop.
    requiretls: bool = False


class ParameterRefused(ValueError):
    """A MAIL parameter the session cannot take: ``reply`` says why."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


#: A parameter's reader: (the result so far, its value or True when it has
#: none, the session is on TLS) -> the result with the parameter applied.
Reader = Callable[[MailParameters, str | bool, bool], MailParameters]


def _requiretls(params: MailParameters, value: str | bool, tls: bool) -> MailParameters:
    if value is not True:
        raise ParameterRefused(errors.BAD_SYNTAX)  # RFC 8689 section 2: no value
    if not tls:
        # RFC 8689 section 2: only in a session that employs TLS (the
        # keyword is advertised only after STARTTLS).
        raise ParameterRefused(errors.REQUIRETLS_NEEDS_TLS)
    return dataclasses.replace(params, requiretls=True)


#: Every MAIL parameter relay implements beyond aiosmtpd's, by its upper-case name.
MAIL_PARAMETERS: Mapping[str, Reader] = {
    "REQUIRETLS": _requiretls,
}


def parse_mail(options: Sequence[str], *, tls: bool) -> MailParameters:
    """The parameters of MAIL FROM (``options``: "NAME" or "NAME=value" each);
    those aiosmtpd handles (SIZE, BODY, SMTPUTF8) are skipped.

    Raises :class:`ParameterRefused` for a parameter the session cannot take.
    """
    params = MailParameters()
    for option in options:
        name, eq, value = option.partition("=")
        reader = MAIL_PARAMETERS.get(name.upper())
        if reader is not None:
            params = reader(params, value if eq else True, tls)
    return params


def mail_extensions(tls: bool) -> list[str]:
    """The EHLO keywords for :data:`MAIL_PARAMETERS`, in this session's state.

    REQUIRETLS only on a TLS session (RFC 8689 section 2).
    """
    return ["REQUIRETLS"] if tls else []
