"""Which stream entries become deliveries: envelope decoding and idempotency claims.

Every instance decodes the entries it reads and claims each idempotency key for the first
entry that carries it (``SET NX GET``), so that all instances, in any order, deliver the same
entry of a key and skip the others.  History reads look the claims up without claiming.
"""

from __future__ import annotations

import collections
import logging

from roomcast.broker.base import PayloadCheck, Publication
from roomcast.broker.envelope import EnvelopeError, decode_envelope
from roomcast.broker.keys import Keys
from roomcast.broker.redis.connection import Client, Entry, text

__all__ = ["EntryFilter"]

logger = logging.getLogger("roomcast.broker")


class EntryFilter:
    """Decodes entries and settles idempotency keys; counts what it drops in ``dropped``."""

    def __init__(
        self,
        keys: Keys,
        *,
        idempotency_window_ms: int,
        dropped: collections.Counter[str],
        check: PayloadCheck | None = None,
    ) -> None:
        self._keys = keys
        self._window_ms = idempotency_window_ms
        self._dropped = dropped
        self._check = check

    def refuses(self, publication: Publication) -> bool:
        """Whether the payload check refuses ``publication`` (not counted: :meth:`decode`,
        which reads it from the stream again, counts and logs it)."""
        return self._check is not None and self._check(publication) is not None

    def decode(
        self, room: str, entries: list[Entry], *, reason_prefix: str
    ) -> list[tuple[str, Publication | None]]:
        """Decode entries; a malformed one is counted, logged and returned as ``None``.

        Deliveries count under ``malformed_envelope``, history reads under
        ``history_malformed_envelope`` (``reason_prefix``), so one entry is not counted twice
        as an undelivered publication.
        """
        decoded: list[tuple[str, Publication | None]] = []
        for raw_id, fields in entries:
            entry_id = text(raw_id)
            try:
                publication = decode_envelope(entry_id, fields, room=room)
            except EnvelopeError as exc:
                reason = f"{reason_prefix}malformed_envelope"
                self._dropped[reason] += 1
                logger.warning("dropped entry %s of room %r: %s (%s)", entry_id, room, reason, exc)
                decoded.append((entry_id, None))
                continue
            refusal = None if self._check is None else self._check(publication)
            if refusal is not None:
                reason = f"{reason_prefix}invalid_payload"
                self._dropped[reason] += 1
                logger.warning(
                    "dropped entry %s of room %r: %s (%s)", entry_id, room, reason, refusal
                )
                decoded.append((entry_id, None))
                continue
            decoded.append((entry_id, publication))
        return decoded

    async def duplicates(
        self, client: Client, publications: list[Publication], *, claim: bool = True
    ) -> set[str]:
        """Offsets of publications whose idempotency key belongs to another entry.

        With ``claim``, an unclaimed key is claimed for the entry (``SET NX GET``), so every
        instance, in any order, agrees on which entry of a key is the one to deliver.
        """
        keyed = [pub for pub in publications if pub.idempotency_key is not None]
        if not keyed:
            return set()
        pipe = client.pipeline(transaction=False)
        for pub in keyed:
            key = self._keys.idempotency(pub.topic, pub.idempotency_key or "")
            if claim:
                pipe.set(key, f"{pub.id}|{pub.offset}", nx=True, get=True, px=self._window_ms)
            else:
                pipe.get(key)
        results = await pipe.execute()
        duplicates: set[str] = set()
        reason = "duplicate_idempotency_key" if claim else "history_duplicate_idempotency_key"
        for pub, stored in zip(keyed, results, strict=True):
            if stored is None:
                continue
            _, _, owner = text(stored).partition("|")
            if owner != pub.offset:
                duplicates.add(pub.offset)
                self._dropped[reason] += 1
                logger.info(
                    "dropped entry %s of room %r: %s %r (first: %s)",
                    pub.offset,
                    pub.topic,
                    reason,
                    pub.idempotency_key,
                    owner,
                )
        return duplicates

    async def history(self, client: Client, room: str, entries: list[Entry]) -> list[Publication]:
        """The publications of ``entries`` that a history read returns: decoded, and not a
        duplicate of another entry's idempotency key (looked up, not claimed)."""
        pairs = self.decode(room, entries, reason_prefix="history_")
        decoded = [pub for _, pub in pairs if pub is not None]
        skip = await self.duplicates(client, decoded, claim=False)
        return [pub for pub in decoded if pub.offset not in skip]
