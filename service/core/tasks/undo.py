"""Backspace for char-LM sessions: take the last characters back without re-feeding the whole text.

A session's recurrent state cannot be stepped backwards, and without help a client whose user pressed backspace
must reset the session and send its whole text again: O(prefix), what sessions exist to avoid. With
``undo_chars`` U > 0 a char-LM session also keeps, in its context:

- up to two **checkpoints**: the state and next-character logits at the last two multiples of U it passed (or,
  for a session that kept none yet, where it stood when it began keeping them);
- the **characters since the older checkpoint** (fewer than 2U).

Taking b characters back to position t = steps - b starts from the newest checkpoint at or before t and feeds
the kept characters up to t: at most 2U steps in one run, whatever the text's length, and the same bits as
feeding the text whole. A feed that crosses multiples of U is cut there, so their states are kept (at most three
runs per feed: only the last two crossings are kept). It costs the session two states, two logits and 2U
characters of memory (``nbytes``); with U = 0 (the default) nothing is kept and nothing changes.

How far back a session can go: always at least U characters right after it advanced past the older checkpoint's
position + U; after backspaces, down to the older checkpoint. Further is refused (FAILED_PRECONDITION, saying
how far it can go): the client then resets with its text.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass

import numpy as np

from service.core.arrays import I64
from service.core.tasks.base import Array
from service.core.types import FloatArray
from service.errors import FailedPrecondition

PREFIX = "undo."
IDS, POSITIONS = PREFIX + "ids", PREFIX + "pos"
MAX_MARKS = 2
MAX_IDS = 2 * 4096  # characters a context may keep: fewer than 2U, U at most 4096 (``Settings.undo_chars``)


@dataclass
class Mark:
    pos: int  # the session's steps at this checkpoint
    state: dict[str, Array]
    logits: FloatArray | None  # None at position 0 of a session that consumed nothing


@dataclass
class Undo:
    every: int  # U: checkpoints at its multiples
    marks: list[Mark]  # oldest first, at most MAX_MARKS
    ids: list[int]  # the characters from marks[0].pos to the session's steps

    @classmethod
    def start(cls, every: int, steps: int, state: dict[str, Array], logits: FloatArray | None) -> Undo:
        """Keeping begins where the session stands."""
        return cls(every, [Mark(steps, state, logits)], [])

    @classmethod
    def load(
        cls, every: int, context: dict[str, Array], steps: int, state: dict[str, Array], logits: FloatArray | None
    ) -> Undo:
        """What a session's context keeps; a fresh start where it keeps nothing usable (a session from before
        undo was on, or kept for another U)."""
        ids, offsets = context.get(IDS), context.get(POSITIONS)
        if ids is None or offsets is None or not 1 <= offsets.size <= MAX_MARKS or ids.size >= 2 * every:
            return cls.start(every, steps, state, logits)
        marks = []
        for k, back in enumerate(offsets.astype(np.int64).tolist()):
            mark_logits = context.get(f"{PREFIX}{k}.logits")
            mark_state = {name[len(f"{PREFIX}{k}.") :]: v for name, v in context.items()
                          if name.startswith(f"{PREFIX}{k}.") and name != f"{PREFIX}{k}.logits"}  # fmt: skip
            if set(mark_state) != set(state):
                return cls.start(every, steps, state, logits)
            marks.append(Mark(steps - back, mark_state, mark_logits))
        if marks[0].pos != steps - ids.size or marks[0].pos < 0:
            return cls.start(every, steps, state, logits)
        return cls(every, marks, ids.astype(np.int64).tolist())

    def context(self, steps: int) -> dict[str, Array]:
        """The session context entries that keep this (float32, as every context entry)."""
        out: dict[str, Array] = {
            IDS: np.asarray(self.ids, dtype=np.float32),  # vocabulary indices: exact in float32
            POSITIONS: np.asarray([steps - m.pos for m in self.marks], dtype=np.float32),  # each < 2U back
        }
        for k, m in enumerate(self.marks):
            out |= {f"{PREFIX}{k}.{name}": v for name, v in m.state.items()}
            if m.logits is not None:
                out[f"{PREFIX}{k}.logits"] = m.logits
        return out

    def cuts(self, start: int, n: int) -> list[int]:
        """Offsets within a feed of ``n`` characters from position ``start`` where a checkpoint falls: the
        multiples of U past the newest mark, the last two of them only (older ones would be dropped)."""
        first = (max(start, self.marks[-1].pos) // self.every + 1) * self.every
        return [p - start for p in range(first, start + n + 1, self.every)][-MAX_MARKS:]

    def stepped(self, ids: I64, pos: int, state: dict[str, Array], logits: FloatArray | None) -> None:
        """The cursor was fed ``ids`` and stands at ``pos``: keep them, and take a checkpoint when ``pos`` is a
        multiple of U past the newest one (the oldest beyond two is dropped, with its characters)."""
        self.ids.extend(int(i) for i in ids)
        if pos % self.every or pos <= self.marks[-1].pos:
            return
        self.marks.append(Mark(pos, state, logits))
        if len(self.marks) > MAX_MARKS:
            dropped = self.marks.pop(0)
            del self.ids[: self.marks[0].pos - dropped.pos]

    def reach(self, steps: int) -> int:
        """How many characters a session at ``steps`` can take back."""
        return steps - self.marks[0].pos

    def rewind(self, steps: int, back: int, field: str) -> tuple[Mark, I64]:
        """For taking ``back`` characters from a session at ``steps``: the checkpoint to start from and the kept
        characters to feed after it; drops what lies past the new end. FailedPrecondition beyond the oldest."""
        if back > self.reach(steps):
            raise FailedPrecondition(
                f"{field} is {back}, but this session can take back at most {self.reach(steps)} characters now "
                f"(it keeps its last {self.every} to {2 * self.every - 1}, fewer after backspaces: UNDO_CHARS); "
                "reset it with the text instead"
            )
        target = steps - back
        while len(self.marks) > 1 and self.marks[-1].pos > target:
            self.marks.pop()
        base = self.marks[-1]
        del self.ids[target - self.marks[0].pos :]
        return base, np.asarray(self.ids[base.pos - self.marks[0].pos :], dtype=np.int64)


def context_shapes(state: dict[str, Array], vocab: int) -> dict[str, tuple[Container[int], ...]]:
    """What the undo entries of a session context may hold (``Task.context_shapes``); declared whatever U is, so
    that a session kept with another U, or with undo on where it is off, can be imported (``Undo.load`` starts
    afresh from what does not fit; entries kept where undo is off are dropped at the next step)."""
    shapes: dict[str, tuple[Container[int], ...]] = {
        IDS: (range(0, MAX_IDS),),
        POSITIONS: (range(1, MAX_MARKS + 1),),
    }
    for k in range(MAX_MARKS):
        shapes[f"{PREFIX}{k}.logits"] = ({vocab},)
        shapes |= {f"{PREFIX}{k}.{name}": tuple({n} for n in v.shape) for name, v in state.items()}
    return shapes


def nbytes(every: int, state: dict[str, Array], vocab: int) -> int:
    """What keeping undo adds to a session: two states and logits, 2U characters and two positions."""
    if every == 0:
        return 0
    return MAX_MARKS * (sum(int(v.nbytes) for v in state.values()) + 4 * vocab) + 4 * 2 * every + 4 * MAX_MARKS
