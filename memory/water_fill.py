"""Splitting a token total among layers: water-filling under per-layer caps and floors, with
page-aligned shares. Pure arithmetic on ints; ``budgets.py`` builds the plans with it."""

from __future__ import annotations

from collections.abc import Sequence


# ------------------------------------------------------------------------- water filling
def _level_fill(total: int, caps: Sequence[int]) -> list[int]:
    """Split ``total`` as equally as possible with ``alloc[i] <= caps[i]`` (extra units go to
    the lowest indices); returns ``caps`` when they sum to less than ``total``."""
    n = len(caps)
    if total >= sum(caps):
        return list(caps)
    alloc = [0] * n
    remaining, left = total, n
    order = sorted(range(n), key=lambda i: (caps[i], i))
    for pos, i in enumerate(order):
        share = remaining // left
        if caps[i] <= share:
            alloc[i] = caps[i]
            remaining -= caps[i]
            left -= 1
            continue
        rest = sorted(order[pos:])
        extra = remaining - share * len(rest)
        for j in rest:  # cap > share here, so share + 1 still fits
            alloc[j] = share + (1 if extra > 0 else 0)
            extra -= 1
        break
    return alloc


def water_fill(total: int, caps: Sequence[int], align: int = 1, floors: Sequence[int] | None = None) -> list[int]:
    """Distribute ``total`` tokens over entries with capacities ``caps``, as equally as possible.

    With ``align > 1`` the equal split is done in whole units of ``align`` tokens and the
    remainder (less than one unit per entry) is packed greedily into as few entries as
    possible, so that the split wastes few partial pages. ``floors`` (each clipped to its cap)
    are per-entry minimums that survive the alignment: an entry the aligned split would leave
    below its floor is pinned at the floor and the others share the rest (the refiners'
    window minimum when it is not a multiple of the page size). Raises if ``total > sum(caps)``
    or ``total`` is below the floors.
    """
    if total < 0 or any(c < 0 for c in caps):
        raise ValueError(f"water_fill: total and caps must be >= 0, got {total} and {list(caps)}")
    if total > sum(caps):
        raise ValueError(f"water_fill: cannot place {total} tokens in capacities summing to {sum(caps)}")
    if floors is not None:
        return _floored_fill(total, list(caps), [min(f, c) for f, c in zip(floors, caps)], align)
    units = _level_fill(total // align, [c // align for c in caps])
    alloc = [u * align for u in units]
    rem = total - sum(alloc)
    for i, c in enumerate(caps):
        if rem == 0:
            break
        add = min(rem, c - alloc[i])
        alloc[i] += add
        rem -= add
    return alloc


def _floored_fill(total: int, caps: list[int], lo: list[int], align: int) -> list[int]:
    """``water_fill`` with per-entry minimums ``lo`` (``lo <= caps``): pin the entries the
    aligned split leaves below their minimum, split the rest among the others, repeat."""
    if len(lo) != len(caps) or any(f < 0 for f in lo):
        raise ValueError(f"water_fill: floors must be >= 0, one per entry, got {lo}")
    if total < sum(lo):
        raise ValueError(f"water_fill: {total} tokens cannot meet floors summing to {sum(lo)}")
    alloc = [0] * len(caps)
    free = list(range(len(caps)))
    while free:
        rest = total - sum(alloc[i] for i in range(len(caps)) if i not in free)
        part = water_fill(rest, [caps[i] for i in free], align)
        low = [i for i, a in zip(free, part) if a < lo[i]]
        if not low:
            for i, a in zip(free, part):
                alloc[i] = a
            break
        for i in low:  # each round pins at least one entry: terminates
            alloc[i] = lo[i]
        free = [i for i in free if i not in low]
    if align > 1:  # pinned entries pay a partial page anyway: move other partial pages into it
        pinned = [i for i in range(len(caps)) if i not in free]
        def room(j: int) -> int:
            return min(caps[j], -(-alloc[j] // align) * align) - alloc[j]

        for i in sorted(free, key=lambda i: alloc[i] % align):
            part = alloc[i] % align
            if part == 0 or alloc[i] - part < lo[i] or part > sum(room(j) for j in pinned):
                continue  # only whole partial pages move (that saves a page), never below a floor
            for j in pinned:
                move = min(part, room(j))
                alloc[i] -= move
                alloc[j] += move
                part -= move
    return alloc


def fill_up(alloc: list[int], total: int, caps: Sequence[int], align: int) -> list[int]:
    """Top ``alloc`` up to ``total`` using the headroom left under ``caps``."""
    missing = total - sum(alloc)
    if missing <= 0:
        return alloc
    extra = water_fill(missing, [c - a for a, c in zip(alloc, caps)], align)
    return [a + e for a, e in zip(alloc, extra)]


