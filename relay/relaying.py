"""Relay policy: which clients may relay, and which recipients a client may send to.

Pure rules over the config (docs/inbound.md): one decision of "may this
client relay", asked by inbound at each RCPT and connection and by the
scheduler when it picks a route.
"""

from __future__ import annotations

from relay import errors
from relay.addresses import client_address, domain_key, domain_of
from relay.config import Config, ServerConfig
from relay.errors import Reply

#: Characters a next hop may read as a route inside a local part.
ROUTING_CHARACTERS = frozenset("%!@")


def may_relay(server: ServerConfig, ip: str) -> bool:
    """True when the client at ``ip`` is in ``[server] relay_networks``
    (may relay to any domain)."""
    addr = client_address(ip)
    return addr is not None and any(addr in net for net in server.relay_networks)


def has_routing_characters(mailbox: str) -> bool:
    """True when the local part holds ``%``, ``!`` or (quoted) ``@``."""
    return not ROUTING_CHARACTERS.isdisjoint(mailbox.rpartition("@")[0])


def recipient_reply(config: Config, client_ip: str, mailbox: str, sender: str = "") -> Reply:
    """Accept or refuse one recipient (a mailbox from
    :func:`relay.addresses.parse_path`) of mail from ``sender`` (rules may
    match the sender too).

    * an address literal (``user@[192.0.2.1]``): refused for everyone,
      550 5.7.1 -- it names no domain the rules could route;
    * a domain in ``domains``: accepted when a rule matches, else 550 5.1.1
      -- for every client, trusted or not: its public MX is usually this
      relay, so sending it there would loop ("mail for X loops back to
      myself", as Postfix says);
    * a client in ``relay_networks``: accepted, any other domain;
    * anything else: 550 5.7.1 relaying denied.

    The domain is the part after the *last* "@", the one RFC 5321 routes
    by; ``%``, ``!`` and quoted ``@`` in the local part are never
    interpreted here (section 2.3.11: only the destination host does).
    But the next hop may interpret them (``user%other.test@ours`` is
    sendmail's "percent hack"), turning our route into an open relay, so
    for a served domain they are refused (550 5.7.1) to clients outside
    ``relay_networks`` unless ``allow_routing_characters`` (Postfix's
    ``allow_untrusted_routing = no``).
    It is compared as A-labels, so ``user@bücher.example`` (RFC 6531
    section 3.3) is the served domain ``xn--bcher-kva.example``.
    """
    domain = domain_of(mailbox)
    if domain.startswith("["):
        return errors.RELAYING_DENIED
    server = config.server
    if domain_key(domain) in server.domains:
        if (
            has_routing_characters(mailbox)
            and not server.allow_routing_characters
            and not may_relay(server, client_ip)
        ):
            return errors.ROUTING_CHARACTERS
        return errors.RECIPIENT_OK if config.route_for(mailbox, sender) else errors.NO_ROUTE
    if may_relay(server, client_ip):
        return errors.RECIPIENT_OK
    return errors.RELAYING_DENIED
