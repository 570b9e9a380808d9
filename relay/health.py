"""Next-hop health: which hosts are down, for how long, and which attempt may probe them.

One :class:`Health` per daemon, shared by every delivery attempt, keyed by
the next hop's IP address and port (:data:`HostKey`), whatever route or
name led there.

What marks a host down (:func:`marks_down`): no TCP connection, no greeting
within ``[delivery] connect_timeout``, a 4xx/5xx greeting, or the session
lost before MAIL (during EHLO or STARTTLS). Replies to MAIL, RCPT and
DATA, slow replies after the greeting and TLS-policy verdicts say
something about the message or the policy, not about the host being
alive: they never mark it down (a host that greeted is up).

Hold-down: a host that goes down is skipped for ``[delivery] hold_down``
seconds. When it expires, exactly one attempt may try it again (the
*probe* is that attempt's real delivery; :meth:`claim` hands it out, and
every other attempt keeps skipping the host until the probe ends). A
probe that fails doubles the hold-down, up to ``[delivery]
max_hold_down``; any success brings the host back at once and resets it.
An attempt left without a host while a probe runs waits for its outcome
(:meth:`Health.probe_ended`, the scheduler parks the message: relay.queue)
instead of waiting out a whole backoff behind a host that may be back.

A state change logs one line (``event=host_down`` / ``event=host_up``) and
counts ``relay_host_state_changes_total``; a message skipping a down host
logs nothing. ``relay_host_up{route,host}`` follows the hosts written in
the configuration: a configured host is down when every address it was
last seen at is down. Hosts found through MX lookups count under the
route host (the domain) that led to them, and hosts of the implicit route
under ``(mx)``, so the labels stay bounded by the configuration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from relay import errors, events
from relay.config import Config
from relay.errors import RelayError
from relay.metrics import Metrics

#: (IP address, port): one next hop as health sees it.
HostKey = tuple[str, int]
#: (route name, configured host, port): a host as the configuration names it.
_Group = tuple[str, str, int]
#: Done when a host's probe ends: True when it tried the host (which is up
#: again, or held down longer), False when its attempt ended without trying it.
ProbeEnd = asyncio.Future[bool]

UP = "up"
DOWN = "down"


def marks_down(error: RelayError) -> bool:
    """True when ``error``, met while opening a session, says the host is not alive.

    HostUnreachable: no connection, connect or greeting timeout, 4xx/5xx
    greeting. ConnectionLost: dropped before MAIL (a reply lost after the
    final dot is ReplyLost and never reaches here). Anything else (a
    TLS-policy verdict, a 4xx to STARTTLS) came after a greeting.
    """
    return isinstance(error, errors.HostUnreachable | errors.ConnectionLost) and not isinstance(
        error, errors.ReplyLost
    )


@dataclass(slots=True)
class HostState:
    """What is known about one next hop that has failed at least once."""

    address: str
    port: int
    #: The host name it was last tried under (for log lines and status).
    name: str
    up: bool = True
    #: Wall-clock time of the last state change.
    since: float = 0.0
    #: The current hold-down in seconds (0 while up).
    hold: float = 0.0
    #: time.monotonic() at which the hold-down ends.
    until: float = 0.0
    last_error: str = ""
    #: The attempt probing the host (see :meth:`Health.claim`), if any.
    probe: object | None = None
    #: Done when the running probe ends (:meth:`Health.probe_ended`); made
    #: only when someone waits for it.
    ended: ProbeEnd | None = None


class Health:
    """The state of every next hop that failed, shared by all attempts.

    ``config`` is read at every failure, so a reload changing the hold-down
    applies to the next one. ``clock`` (monotonic) times hold-downs;
    ``wall`` only dates them for humans.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._wall = wall
        self.started = wall()
        self._hosts: dict[HostKey, HostState] = {}
        #: (route, configured host, port) -> the addresses it was last seen
        #: at: what ``relay_host_up`` and ``relay status`` report per configured host.
        self._groups: dict[_Group, set[HostKey]] = {}
        self.reconfigure(config())

    # --- what an attempt may use ------------------------------------------------

    def available(self, key: HostKey) -> bool:
        """Up, or down with its hold-down over and nobody probing it yet."""
        state = self._hosts.get(key)
        if state is None or state.up:
            return True
        return state.probe is None and self._clock() >= state.until

    def claim(self, key: HostKey, token: object) -> bool:
        """May the attempt ``token`` try ``key``? Takes the probe of a host whose
        hold-down is over, so that no other attempt tries it meanwhile."""
        state = self._hosts.get(key)
        if state is None or state.up:
            return True
        if state.probe is token:
            return True
        if not self.available(key):
            return False
        state.probe = token
        return True

    def release(self, token: object) -> None:
        """The attempt ``token`` ended: probes it took but never ran are free again."""
        for state in self._hosts.values():
            if state.probe is token:
                _probe_over(state, ran=False)

    def probing(self, key: HostKey) -> bool:
        """Held down, and an attempt is probing it now."""
        state = self._hosts.get(key)
        return state is not None and not state.up and state.probe is not None

    def probe_ended(self, keys: Iterable[HostKey]) -> list[ProbeEnd]:
        """One :data:`ProbeEnd` per host of ``keys`` being probed now, done when
        its probe ends (bounded by the probing attempt's own timeouts)."""
        out: list[ProbeEnd] = []
        for key in dict.fromkeys(keys):
            state = self._hosts.get(key)
            if state is None or state.up or state.probe is None:
                continue
            if state.ended is None:
                state.ended = asyncio.get_running_loop().create_future()
            out.append(state.ended)
        return out

    def end_hold_downs(self) -> int:
        """Every held-down host is due for its probe now (``relay queue flush``,
        as Postfix's flush retries dead destinations); the number of hosts.
        Still one probe per host: the others skip it, or wait for the probe's
        outcome (:meth:`probe_ended`), until it ends."""
        now = self._clock()
        due = [s for s in self._hosts.values() if not s.up and s.until > now]
        for state in due:
            state.until = now
        return len(due)

    def is_down(self, key: HostKey) -> bool:
        state = self._hosts.get(key)
        return state is not None and not state.up

    # --- what an attempt found --------------------------------------------------

    def succeeded(self, key: HostKey, name: str, route: str, label: str) -> None:
        """The host greeted and answered EHLO: it is up."""
        state = self._hosts.get(key)
        if state is None:
            return
        if state.up:
            if not self._in_group(key):
                del self._hosts[key]  # nothing to remember about a healthy stranger
            return
        down_for = self._wall() - state.since
        state.up, state.hold, state.until = True, 0.0, 0.0
        _probe_over(state)
        state.since = self._wall()
        events.log(
            "host_up", host=name, ip=key[0], port=key[1], route=route,
            down_for=f"{down_for:.0f}s",
        )  # fmt: skip
        self._changed(key, route, label, UP)

    def failed(
        self,
        key: HostKey,
        name: str,
        route: str,
        label: str,
        error: RelayError,
        token: object = None,
    ) -> None:
        """The attempt ``token`` found the host failing as :func:`marks_down`
        says: hold it down (longer, when that attempt was its probe)."""
        settings = self._config().delivery
        now = self._clock()
        state = self._hosts.get(key)
        if state is None:
            self._prune(now, settings.max_hold_down)
            state = self._hosts[key] = HostState(key[0], key[1], name)
        state.name, state.last_error = name, error.detail or str(error.reply)
        if state.up:
            state.up, state.hold, state.since = False, settings.hold_down, self._wall()
            state.until = now + state.hold
            _probe_over(state)
            self._log_down("host_down", state, route)
            self._changed(key, route, label, DOWN)
            return
        mine = token is not None and state.probe is token
        probing = mine or (state.probe is None and now >= state.until)
        if not probing:
            # An attempt that was already connecting when the host went
            # down: the same outage, not a failed probe.
            return
        # The probe failed: hold it down twice as long (RFC 5321 section
        # 4.5.4.1 asks for retries to back off; so do we, per host).
        state.hold = min(max(state.hold, settings.hold_down) * 2, settings.max_hold_down)
        state.until = now + state.hold
        _probe_over(state)
        self._log_down("host_probe_failed", state, route)

    def _prune(self, now: float, keep: float) -> None:
        """Forget hosts outside the configuration (MX hosts of the implicit
        route) that nothing tried for ``keep`` seconds after their hold-down:
        the state does not grow with every host that ever failed."""
        stale = [
            key
            for key, state in self._hosts.items()
            if not state.up and state.probe is None and now > state.until + keep
            and not self._in_group(key)
        ]  # fmt: skip
        for key in stale:
            del self._hosts[key]

    def _log_down(self, event: str, state: HostState, route: str) -> None:
        events.warning(
            event, host=state.name, ip=state.address, port=state.port, route=route,
            reason=state.last_error, hold_down=f"{state.hold:.0f}s",
        )  # fmt: skip

    def _changed(self, key: HostKey, route: str, label: str, state: str) -> None:
        self._metrics.host_state_changes.labels(route, label, state).inc()
        for group, keys in self._groups.items():
            if key in keys:
                self._export(group[0], group[1])

    # --- configured hosts (metrics, status, reload) -----------------------------

    def seen(self, route: str, host: str, port: int, keys: Iterable[HostKey]) -> None:
        """A plan found configured ``host``:``port`` of ``route`` at ``keys``."""
        group = (route, host, port)
        if group not in self._groups:
            return  # not a configured host (the implicit route, or a removed one)
        fresh = set(keys)
        if fresh != self._groups[group]:
            self._groups[group] = fresh
            self._export(route, host)

    def _in_group(self, key: HostKey) -> bool:
        return any(key in keys for keys in self._groups.values())

    def _export(self, route: str, host: str) -> None:
        """``relay_host_up{route, host}``: 0 once every address seen for it is down
        (the same name on two ports shares the label)."""
        keys = [k for g, ks in self._groups.items() if g[:2] == (route, host) for k in ks]
        down = bool(keys) and all(self.is_down(k) for k in keys)
        self._metrics.host_up.labels(route, host).set(0 if down else 1)

    def reconfigure(self, config: Config) -> None:
        """A config took effect: keep the state of the hosts it still names.

        A configured host no longer in its route loses its metric series,
        and its addresses their state unless another configured host uses
        them too; a host still in the config keeps its hold-down.
        """
        wanted = {
            (route.name, host.name, host.port)
            for route in config.routes
            for host in (*route.primary, *route.secondary)
        }
        removed = [group for group in self._groups if group not in wanted]
        orphans: set[HostKey] = set()
        for group in removed:
            orphans |= self._groups.pop(group)
        labels = {group[:2] for group in wanted}
        for route, host, _ in removed:
            if (route, host) not in labels:
                self._metrics.host_up.remove(route, host)
        for group in wanted:
            self._groups.setdefault(group, set())
        for route, host in labels:
            self._export(route, host)
        for key in orphans - {k for keys in self._groups.values() for k in keys}:
            state = self._hosts.pop(key, None)
            if state is not None:
                _probe_over(state)

    # --- relay status -----------------------------------------------------------

    def _when(self, monotonic: float) -> float:
        return self._wall() + (monotonic - self._clock())

    def describe(self, key: HostKey) -> dict[str, Any]:
        """One address's state as JSON-ready data (``relay status``)."""
        state = self._hosts.get(key)
        if state is None:
            return {"address": key[0], "port": key[1], "state": UP, "since": self.started}
        out: dict[str, Any] = {
            "address": key[0],
            "port": key[1],
            "state": UP if state.up else DOWN,
            "since": state.since,
            "last_error": state.last_error or None,
        }
        if not state.up:
            out["hold_down"] = state.hold
            out["next_probe"] = self._when(state.until)
            out["probing"] = state.probe is not None
        return out

    def snapshot(self, config: Config) -> list[dict[str, Any]]:
        """Per route, each configured host's state and its addresses' (``relay status``).

        A configured host is ``down`` when every address it was last seen
        at is down. Down next hops outside any configured host (MX hosts
        of the implicit route) follow as one more entry, route ``(mx)``.
        """
        routes: list[dict[str, Any]] = []
        for route in config.routes:
            hosts = []
            tables = [("primary", route.primary), ("secondary", route.secondary)]
            for table, members in tables:
                for host in members:
                    keys = sorted(self._groups.get((route.name, host.name, host.port), ()))
                    addresses = [self.describe(k) for k in keys]
                    down = bool(keys) and all(a["state"] == DOWN for a in addresses)
                    entry: dict[str, Any] = {
                        "host": host.name,
                        "port": host.port,
                        "table": table,
                        "state": DOWN if down else UP,
                        "addresses": addresses,
                    }
                    entry.update(_summary(addresses, down, self.started))
                    hosts.append(entry)
            routes.append({"route": route.name, "hosts": hosts})
        grouped = {k for keys in self._groups.values() for k in keys}
        strays = [
            self.describe(key)
            for key, state in sorted(self._hosts.items())
            if not state.up and key not in grouped
        ]
        if strays:
            hosts = [
                {
                    "host": self._hosts[(a["address"], a["port"])].name,
                    "table": "mx",
                    "addresses": [a],
                    **a,
                }  # fmt: skip
                for a in strays
            ]
            routes.append({"route": "(mx)", "hosts": hosts})
        return routes


def _probe_over(state: HostState, ran: bool = True) -> None:
    """The host's probe (if any) ended, having tried the host or not (``ran``):
    whoever waits for it learns so."""
    state.probe = None
    if state.ended is not None:
        if not state.ended.done():
            state.ended.set_result(ran)
        state.ended = None


def _summary(addresses: list[dict[str, Any]], down: bool, started: float) -> dict[str, Any]:
    """since / last_error / next_probe of a configured host from its addresses'."""
    if not addresses:
        return {"since": started, "last_error": None}
    relevant = [a for a in addresses if (a["state"] == DOWN) == down] or addresses
    out: dict[str, Any] = {
        "since": max(a["since"] for a in relevant),
        "last_error": next((a["last_error"] for a in relevant if a.get("last_error")), None),
    }
    if down:
        out["next_probe"] = min(a["next_probe"] for a in relevant)
    return out
