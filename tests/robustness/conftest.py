"""Reports how many fuzz cases each loader saw, and how they ended, at the end of the test session."""

from __future__ import annotations

from .fuzzing import OUTCOMES


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not OUTCOMES:
        return
    terminalreporter.section("torchdrr fuzz cases")
    for kind in sorted(OUTCOMES):
        counts = OUTCOMES[kind]
        detail = ", ".join(f"{outcome} {count}" for outcome, count in sorted(counts.items()))
        terminalreporter.write_line(f"{kind}: {sum(counts.values())} cases ({detail})")
