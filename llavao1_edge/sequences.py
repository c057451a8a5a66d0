"""The engine's sequences during a search: which are in use, which are kept, and how many KV cells they hold.

Sequence 0 holds the prefix (prompt, image, chosen stages). A step's candidates use sequences 1..n:
they start on sequence 1 and fork into spare ones where they diverge. Judge prompts use the sequences
after the candidates; a knockout round's judge sequences are held for the next round, whose prompts
start the same way. The cell counts are what keeps every batch inside the KV cache.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .engine import Engine, SeqState


class SequencePool:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.n_live = 0  # candidate sequences reserved (1..n_live)
        self.cells_held = 0  # KV cells of the prefix and the live candidates, while they are judged
        self.held: dict[int, list] = {}  # judge sequences kept for the next round: seq -> prompt keys
        self.held_cells = 0  # KV cells the held sequences add beyond sequence 0 (an upper bound)

    @property
    def n_seq(self) -> int:
        return self.engine.config.n_seq_max

    @property
    def n_ctx(self) -> int:
        return self.engine.config.n_ctx

    def reset(self) -> None:
        """Every sequence but 0 dropped, nothing reserved or held."""
        self.n_live, self.cells_held, self.held, self.held_cells = 0, 0, {}, 0
        for s in range(1, self.n_seq):
            self.engine.drop(s)

    # -- candidates ------------------------------------------------------------------------------

    def fork_candidates(self, state: SeqState, n: int) -> list[SeqState]:
        """n candidates continuing sequence 0's prefix, all on sequence 1 until they diverge."""
        from .engine import SeqState

        if n + 1 > self.n_seq:
            raise ValueError(f"{n} candidates need n_seq_max >= {n + 1} (have {self.n_seq})")
        for k in range(1, n + 1):
            self.engine.drop(k)
        self.engine.fork(0, 1)
        self.n_live = n
        return [SeqState(1, state.pos, state.logits) for _ in range(n)]

    def spare(self, used: set[int]) -> list[int]:
        """Sequences a diverging candidate can fork into: after the ones in use, none a judge holds."""
        return [q for q in range(1, self.n_seq) if q not in used and q > max(used) and q not in self.held]

    def candidate_cell_limit(self, leave_room_for_judges: bool) -> int:
        """KV cells the prefix and the candidates may fill; a judged step leaves a quarter for judge prompts."""
        return self.n_ctx - (self.n_ctx // 4 if leave_room_for_judges else 0) - 1

    def adopt(self, state: SeqState, winner: SeqState) -> SeqState:
        """The chosen candidate becomes sequence 0's continuation from state.pos; candidates are dropped."""
        from .engine import SeqState

        self.engine.adopt(winner.seq, 0, state.pos)
        for k in range(1, self.n_live + 1):
            self.engine.drop(k)
        return SeqState(0, winner.pos, winner.logits)

    # -- judges ----------------------------------------------------------------------------------

    def judge_sequences(self) -> list[int]:
        """Sequences free for judge prompts: after the candidates', none held."""
        first = self.n_live + 1
        if self.n_seq - first < 1:
            raise ValueError(f"n_seq_max {self.n_seq} leaves no sequence for judging {self.n_live} candidates; "
                             "raise n_seq_max")
        return [s for s in range(first, self.n_seq) if s not in self.held]

    def judge_cells(self) -> int:
        """KV cells left for judge prompts beside the prefix, the candidates and the held judges."""
        return self.n_ctx - 1 - self.cells_held - self.held_cells

    def hold(self, keys: dict[int, list], cells: int) -> None:
        """Keep judge sequences (seq -> the keys of their prompt) and the cells they add."""
        self.held.update(keys)
        self.held_cells += cells

    def release(self) -> None:
        for s in self.held:
            self.engine.drop(s)
        self.held, self.held_cells = {}, 0
