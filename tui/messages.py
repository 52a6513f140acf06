"""What screens tell the app. They post these (they never import the app); the app handles each with
`@on`, updates the Session and the other screens."""

from __future__ import annotations

from pathlib import Path

from textual.message import Message


class ErrorRaised(Message):
    """Something failed: the app shows it in its one error dialog, titled `title`."""

    def __init__(self, error: BaseException, title: str = "Error") -> None:
        super().__init__()
        self.error, self.title = error, title


class RunChosen(Message):
    """`run_dir` is now the app's run: opened, or a run started here has ended."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.run_dir = str(run_dir)


class ConstitutionOpened(Message):
    """The editor now holds `path` (None: a new, unsaved constitution)."""

    def __init__(self, path: str | Path | None) -> None:
        super().__init__()
        self.path = str(path) if path else None


class ConstitutionSaved(Message):
    """The editor saved its constitution to `path`."""

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        self.path = str(path)
