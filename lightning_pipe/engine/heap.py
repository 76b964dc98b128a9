"""Keeping Python's garbage collector from stalling one rank of the pipeline in the middle of a step.

A full collection walks every object the collector tracks. With torch and Lightning imported that is about 400 000
objects, 200 ms here. CPython starts one whenever enough objects have outlived younger collections: at a moment that
each rank reaches on its own, so in the middle of a step one rank stops for 200 ms while the others wait on its
messages (measured here on 4 sleeping ranks: a 200-230 ms stall in about one step of five on some rank, against
steps of 530-590 ms).
``gc.freeze()`` moves the objects alive now (modules, optimizer state, imported libraries) to a permanent generation
that collections skip: later collections, full ones included, then walk only the objects made since, and took
microseconds in the same process. Objects made afterwards are collected as usual.
"""

from __future__ import annotations

import gc

__all__ = ["HeapFreeze"]


class HeapFreeze:
    """Freezes the objects alive at :meth:`freeze` out of Python's garbage collections until :meth:`thaw`.

    Garbage already there is collected first (frozen, it would never be). When something else froze objects before
    (``gc.get_freeze_count() > 0``), :meth:`thaw` leaves the freeze in place: ``gc.unfreeze`` cannot tell its objects
    from ours.
    """

    def __init__(self) -> None:
        self._frozen = False
        self._owned = False

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` ran and :meth:`thaw` has not."""
        return self._frozen

    def freeze(self) -> None:
        """Collect, then freeze what remains; does nothing if already frozen by this object."""
        if self._frozen:
            return
        self._owned = gc.get_freeze_count() == 0
        gc.collect()
        gc.freeze()
        self._frozen = True

    def thaw(self) -> None:
        """Return the frozen objects to the collector (the oldest generation), if this object froze them."""
        if self._frozen and self._owned:
            gc.unfreeze()
        self._frozen = self._owned = False
