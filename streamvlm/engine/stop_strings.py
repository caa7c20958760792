"""Stop strings over streamed text, in time linear in the text and memory linear in the stop strings.

Each stop string has a Knuth-Morris-Pratt automaton whose state is the length of the longest suffix of the
text so far that is a prefix of the stop string. A state that reaches the stop string's length is a match;
the largest state is how much text must be held back because it could still begin a stop string. The held
text is a prefix of one stop string, so it is kept as (which stop, how long) rather than copied.
"""

from __future__ import annotations

from collections.abc import Sequence


def failure_function(pattern: str) -> list[int]:
    """KMP: ``fail[i]`` is the length of the longest proper prefix of ``pattern[:i + 1]`` that is also
    its suffix."""
    fail = [0] * len(pattern)
    k = 0
    for i in range(1, len(pattern)):
        c = pattern[i]
        while k and pattern[k] != c:
            k = fail[k - 1]
        if pattern[k] == c:
            k += 1
        fail[i] = k
    return fail


class StopStringMatcher:
    """Finds the first stop string to complete in text fed piece by piece; releases only the text that
    cannot be part of a stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._fail = [failure_function(s) for s in self.stops]
        self._states = [0] * len(self.stops)
        # The held text is stops[_held_stop][:_held_len].
        self._held_stop = 0
        self._held_len = 0

    @property
    def held_len(self) -> int:
        return self._held_len

    def flush(self) -> str:
        """The held text; matching starts afresh after it."""
        held = self.stops[self._held_stop][:self._held_len] if self._held_len else ""
        self._states = [0] * len(self.stops)
        self._held_stop = self._held_len = 0
        return held

    def feed(self, text: str) -> tuple[str, str | None]:
        """Adds ``text``; returns the text that can be released and the stop string that completed,
        if one did. The first stop string to complete wins; on a tie, the one that starts first. After
        a match the text that follows is not searched: call ``flush`` before feeding more."""
        match: tuple[int, int, int] | None = None  # (end in text, -len(stop), stop index)
        states = []
        for index in range(len(self.stops)):
            end, state = self._advance(index, text)
            states.append(state)
            if end >= 0 and (match is None or (end, -len(self.stops[index])) < match[:2]):
                match = (end, -len(self.stops[index]), index)
        if match is not None:
            stop = self.stops[match[2]]
            released = self._buffer_prefix(self._held_len + match[0] - len(stop), text)
            self._states = [0] * len(self.stops)
            self._held_stop = self._held_len = 0
            return released, stop
        held_len = max(states, default=0)
        released = self._buffer_prefix(self._held_len + len(text) - held_len, text)
        self._states = states
        self._held_stop = states.index(held_len) if held_len else 0
        self._held_len = held_len
        return released, None

    def _buffer_prefix(self, n: int, text: str) -> str:
        """The first ``n`` characters of held text + ``text``, copying only those."""
        held = self.stops[self._held_stop]
        if n <= self._held_len:
            return held[:n]
        return held[:self._held_len] + text[:n - self._held_len]

    def _advance(self, index: int, text: str) -> tuple[int, int]:
        """Runs stop ``index``'s automaton over ``text``: (end of its first match in text, or -1; the
        state after text when there is no match)."""
        stop, fail, k = self.stops[index], self._fail[index], self._states[index]
        first, m, pos = stop[0], len(stop), 0
        while pos < len(text):
            if k == 0:
                # No partial match: skip at C speed to the next character that can begin one.
                pos = text.find(first, pos)
                if pos < 0:
                    return -1, 0
            c = text[pos]
            while k and stop[k] != c:
                k = fail[k - 1]
            if stop[k] == c:
                k += 1
                if k == m:
                    return pos + 1, k
            pos += 1
        return -1, k
