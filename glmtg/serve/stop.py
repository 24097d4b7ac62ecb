"""Stop strings over streamed text: emit what cannot be the start of a stop string, cut at the first hit."""

from __future__ import annotations


class StopMatcher:
    """Feed text pieces; get back the text safe to emit and whether a stop string was hit.

    Text that could still be the beginning of a stop string is held back until the next piece decides
    it, so a stop string split across tokens is still trimmed from the output and never streamed.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.hit = False

    def push(self, text: str) -> str:
        """The emittable text after ``text`` arrives; after a hit, everything from the stop string on is
        dropped and ``hit`` is True."""
        if self.hit:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        first = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if first >= 0:
            self.hit = True
            self._held = ""
            return buf[:first]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep]

    def flush(self) -> str:
        """What was held back, at the end of generation (it turned out not to be a stop string)."""
        text, self._held = ("" if self.hit else self._held), ""
        return text

    def _partial_suffix(self, buf: str) -> int:
        # the longest suffix of buf that is a proper prefix of some stop string
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best
