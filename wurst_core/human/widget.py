"""The rating flow as an ipywidgets widget, for a researcher rating inside JupyterLab.

It uses the same service as the page (``service.StudyService``), so its votes land in the same database with the same
checks, sides and order; the images are read from the study's image folder, the systems never shown::

    from wurst_core.human.widget import RatingWidget
    RatingWidget("study.sqlite", name="me").widget   # the last line of a cell displays it
"""
from __future__ import annotations

import html
import os
from typing import Any

import ipywidgets as widgets
from IPython.display import display

from .service import StudyService


class RatingWidget:
    """Prompt, two images side by side, Left / Neither / Right buttons and a progress count."""

    def __init__(self, db: str | os.PathLike, name: str | None = None, size: int = 256) -> None:
        self.service = StudyService(db)
        self.rater = self.service.register(name)
        self.showing = None
        layout = widgets.Layout(width=f"{size}px", height=f"{size}px")
        self.prompt = widgets.HTML()
        self.left = widgets.Image(format="png", layout=layout)
        self.right = widgets.Image(format="png", layout=layout)
        self.progress = widgets.Label()
        self.buttons = {c: widgets.Button(description=label) for c, label in
                        (("left", "← Left"), ("neither", "Neither"), ("right", "Right →"))}
        for choice, button in self.buttons.items():
            button.on_click(lambda _, c=choice: self.choose(c))
        self.widget = widgets.VBox([self.progress, self.prompt, widgets.HBox([self.left, self.right]),
                                    widgets.HBox(list(self.buttons.values()))])
        self._next()

    def _next(self) -> None:
        self.showing = self.service.next(self.rater.rater_id)
        if self.showing is None:
            done, total = self.service.progress(self.rater.rater_id)
            self.prompt.value = "<b>Every pair is rated. Thank you!</b>"
            self.progress.value = f"{done} of {total} rated"
            for button in self.buttons.values():
                button.disabled = True
            return
        self.prompt.value = f"<p style='font-size:1.2em'>{html.escape(self.showing.prompt)}</p>"
        self.left.value = self.service.image(f"{self.showing.left}.png").read_bytes()
        self.right.value = self.service.image(f"{self.showing.right}.png").read_bytes()
        self.progress.value = f"{self.showing.done} of {self.showing.total} rated"

    def choose(self, choice: str) -> Any:
        """Vote for the pair on screen (what the buttons do) and show the next one; returns the acknowledgement."""
        if self.showing is None:
            return None
        ack = self.service.vote(self.rater.rater_id, self.showing.showing_id, choice)
        self._next()
        return ack

    def _ipython_display_(self) -> None:
        display(self.widget)
