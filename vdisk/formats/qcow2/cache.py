"""The qcow2 metadata caches: bounded LRU caches of L2 tables and refcount blocks, sized as QEMU sizes them.

Design notes
============
Invariant: a table object that a caller holds is the one in the cache, or one that no longer matters.
A cache that evicts on lookup breaks that: a table just loaded is the only clean entry of a cache full of
dirty ones, the lookup's own trim evicts it, and the caller changes a detached copy that no flush ever
writes (the acknowledged-write loss of issue 8: past 32 GiB of random writes with the old 4 MiB cache, the
L2 entries of about half the writes vanished).  So:

* ``lookup`` and ``insert`` never evict.  A cache may hold more than its capacity in the middle of an
  operation: at most what one request touches (bounded by nbdkit's 64 MiB request limit and the stream's
  chunk size).
* Eviction happens only at a *safe point*, where no table reference is alive: the end of the outermost
  metadata section (``MetadataLock``, which the image holds around every use of a table), or an explicit
  ``MetadataLock.safe_point()`` in a long loop that holds the lock throughout (``check``, reading every
  refcount block).  What runs there is ``Qcow2Image.trim_caches``.
* Only clean tables are evicted.  When the tables over capacity are all dirty, the image writes its
  metadata back in crash-safe order first (a full flush, the facade's ``Qcow2Image.flush`` ordering), so no
  eviction ever writes one table out of order.

Idle tables (QEMU's ``cache-clean-interval``): each lookup marks its table used; ``drop_idle`` drops clean
tables not used since the previous call and clears the marks.  The serving process calls it every interval.

Sizes (``cache_tables``) follow QEMU 7.2's ``read_cache_sizes``: by default the L2 cache covers the whole
disk, capped at 32 MiB (``DEFAULT_L2_CACHE_MAX_SIZE`` on Linux), and the refcount cache holds 4 clusters.
``cache-size`` is the sum of the two; setting it alone gives the L2 cache as much as covers the disk and the
rest to refcounts.  One difference on purpose: QEMU never goes below 2 L2 tables and 4 refcount blocks;
vdisk goes down to one of each, so tests can make every path evict, reload and write back all the time.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Callable

from vdisk.errors import InvalidArgument
from vdisk.formats.qcow2.tables import Table

DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024  # QEMU on Linux
DEFAULT_REFCOUNT_CACHE_TABLES = 4  # QEMU's MIN_REFCOUNT_CACHE_SIZE, also its default
DEFAULT_CACHE_CLEAN_INTERVAL = 600  # seconds, QEMU's QCOW2_DEFAULT_CACHE_CLEAN_INTERVAL on Linux
MIN_CACHE_TABLES = 1


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """QEMU's qcow2 cache options, in bytes (None: not set) and seconds (0: never clean)."""

    cache_size: int | None = None
    l2_cache_size: int | None = None
    refcount_cache_size: int | None = None
    cache_clean_interval: int = DEFAULT_CACHE_CLEAN_INTERVAL

    def __post_init__(self) -> None:
        for name in ("cache_size", "l2_cache_size", "refcount_cache_size"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidArgument(f"{name.replace('_', '-')} must not be negative (got {value})")
        if self.cache_clean_interval < 0:
            raise InvalidArgument(f"cache-clean-interval must not be negative (got {self.cache_clean_interval})")
        if self.cache_size is not None:
            if self.l2_cache_size is not None and self.refcount_cache_size is not None:
                raise InvalidArgument("cache-size, l2-cache-size and refcount-cache-size may not be set at the "
                                      "same time")
            if self.l2_cache_size is not None and self.l2_cache_size > self.cache_size:
                raise InvalidArgument("l2-cache-size may not exceed cache-size")
            if self.refcount_cache_size is not None and self.refcount_cache_size > self.cache_size:
                raise InvalidArgument("refcount-cache-size may not exceed cache-size")


TINY_CACHES = CacheOptions(l2_cache_size=1, refcount_cache_size=1)  # one table each: every path evicts


def cache_tables(options: CacheOptions, virtual_size: int, cluster_size: int, l2_entry_bytes: int) -> tuple[int, int]:
    """(L2 tables, refcount blocks) the caches hold, as QEMU's read_cache_sizes computes them."""
    max_l2_cache = -(-(-(-virtual_size // cluster_size) * l2_entry_bytes) // cluster_size) * cluster_size
    min_refcount_cache = DEFAULT_REFCOUNT_CACHE_TABLES * cluster_size
    l2_setting = options.l2_cache_size if options.l2_cache_size is not None else DEFAULT_L2_CACHE_MAX_SIZE
    l2_bytes = min(max_l2_cache, l2_setting)
    refcount_bytes = options.refcount_cache_size or 0
    combined = options.cache_size
    if combined is not None:
        if options.l2_cache_size is not None:
            refcount_bytes = combined - l2_bytes
        elif options.refcount_cache_size is not None:
            l2_bytes = combined - refcount_bytes
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_bytes = max_l2_cache
            refcount_bytes = combined - l2_bytes
        else:
            refcount_bytes = min(combined, min_refcount_cache)
            l2_bytes = combined - refcount_bytes
    l2_tables = max(MIN_CACHE_TABLES, l2_bytes // cluster_size)
    if options.refcount_cache_size is None and combined is None:
        refcount_tables = DEFAULT_REFCOUNT_CACHE_TABLES
    else:
        refcount_tables = max(MIN_CACHE_TABLES, refcount_bytes // cluster_size)
    return l2_tables, refcount_tables


class TableCache:
    """One bounded LRU cache of tables keyed by host offset (see the design notes: lookups never evict)."""

    def __init__(self, capacity: int):
        if capacity < MIN_CACHE_TABLES:
            raise InvalidArgument(f"a table cache holds at least {MIN_CACHE_TABLES} table (got {capacity})")
        self.capacity = capacity
        self._tables: collections.OrderedDict[int, Table] = collections.OrderedDict()
        self._used: set[int] = set()

    def lookup(self, host_offset: int) -> Table | None:
        table = self._tables.get(host_offset)
        if table is not None:
            self._tables.move_to_end(host_offset)
            self._used.add(host_offset)
        return table

    def insert(self, table: Table) -> Table:
        self._tables[table.host_offset] = table
        self._tables.move_to_end(table.host_offset)
        self._used.add(table.host_offset)
        return table

    def dirty(self) -> list[Table]:
        return [t for t in self._tables.values() if t.dirty]

    def evict_clean(self) -> bool:
        """Drop the least recently used clean tables until the cache is within capacity (at a safe point).
        False when it is still over capacity: every table left is dirty and must be written back first."""
        excess = len(self._tables) - self.capacity
        if excess <= 0:
            return True
        for host_offset in [h for h, t in self._tables.items() if not t.dirty][:excess]:
            del self._tables[host_offset]
            self._used.discard(host_offset)
        return len(self._tables) <= self.capacity

    def drop_idle(self) -> int:
        """Drop the clean tables not used since the previous call (cache-clean-interval); returns how many."""
        idle = [h for h, t in self._tables.items() if h not in self._used and not t.dirty]
        for host_offset in idle:
            del self._tables[host_offset]
        self._used.clear()
        return len(idle)


class MetadataLock:
    """A reentrant lock that runs ``at_safe_point`` when its outermost holder is about to release it.

    The image holds it around every use of a table; the outermost release is where no table reference is
    alive, so that is where the caches may evict (see the design notes).  ``at_safe_point`` runs with the
    lock still held and may take it again (it is then not the outermost holder, so it does not recurse).
    If it raises while another exception is leaving the section, the first exception wins.
    """

    def __init__(self, at_safe_point: Callable[[], None]):
        self._lock = threading.RLock()
        self._depth = 0  # changed only by the thread holding _lock
        self._at_safe_point = at_safe_point

    def __enter__(self) -> MetadataLock:
        self._lock.acquire()
        self._depth += 1
        return self

    def safe_point(self) -> None:
        """Run ``at_safe_point`` now, inside a section: for a loop that holds the lock throughout, between two
        tables (the caller holds no table reference at this point)."""
        with self._lock:
            self._at_safe_point()

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._depth == 1:
                try:
                    self._at_safe_point()
                except BaseException:
                    if exc_type is None:
                        raise
        finally:
            self._depth -= 1
            self._lock.release()
