"""The rating flow that every client shares (the page through the server, the notebook widget, the simulator).

A rater registers (a name, or none and gets a generated token), asks for the next pair, and answers it with
``left``, ``right`` or ``neither``. The next pair is the rater's open showing if there is one (a reload shows the same
pair), else the first item in the rater's own order (``design.rater_order``) that they have not judged, shown with the
sides of ``design.a_on_left``. A vote is committed before it is acknowledged; the same showing answered twice with
the same choice is acknowledged again but stored once, and with another choice it is refused (409).

Every refusal is a :class:`StudyError` with an HTTP status (400/401/404/409/422) and a message, raised before
anything is written.
"""
from __future__ import annotations

import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

from .design import a_on_left, rater_order
from .store import CHOICES, Store

TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_NAME = 64


class StudyError(ValueError):
    """A request the study refuses; ``status`` is the HTTP status the server answers with."""

    status = 400


class Unprocessable(StudyError):
    status = 422


class Unauthorised(StudyError):
    status = 401


class NotFound(StudyError):
    status = 404


class Conflict(StudyError):
    status = 409


@dataclass(frozen=True)
class Rater:
    rater_id: str
    name: str | None
    simulated: bool


@dataclass(frozen=True)
class Showing:
    """A pair as the rater sees it: the prompt and the two images by digest (nothing names a system)."""

    showing_id: str
    prompt: str
    left: str
    right: str
    done: int
    total: int

    def public(self) -> dict[str, Any]:
        return {"showing": self.showing_id, "prompt": self.prompt, "left": f"/images/{self.left}.png",
                "right": f"/images/{self.right}.png", "done": self.done, "total": self.total}


@dataclass(frozen=True)
class Ack:
    showing_id: str
    choice: str
    duplicate: bool
    done: int
    total: int


def check_token(value: Any, what: str) -> str:
    if not isinstance(value, str) or not TOKEN.match(value):
        raise Unprocessable(f"{what} must be 1-64 letters, digits, '_' or '-'")
    return value


def check_name(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise Unprocessable("name must be a string")
    name = value.strip()
    if not name or len(name) > MAX_NAME or not name.isprintable():
        raise Unprocessable(f"name must be 1-{MAX_NAME} printable characters")
    return name


def check_choice(value: Any) -> str:
    if value not in CHOICES:
        raise Unprocessable(f"choice must be one of {list(CHOICES)}, got {str(value)[:40]!r}")
    return value


class StudyService:
    """The rating flow on one study database (thread-safe: every call is its own transaction)."""

    def __init__(self, store: Store | str | os.PathLike) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.seed = int(self.store.meta().get("seed", 0))
        with self.store.read() as con:
            self._items = [r[0] for r in con.execute("SELECT item_id FROM items ORDER BY position")]
        if not self._items:
            raise ValueError(f"study {self.store.path} has no items")
        self._orders: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return len(self._items)

    def _order(self, rater_id: str) -> list[str]:
        with self._lock:
            if rater_id not in self._orders:
                self._orders[rater_id] = rater_order(self.seed, rater_id, self._items)
            return self._orders[rater_id]

    # ----------------------------------------------------------------------------------------------- raters

    def register(self, name: Any = None, simulated: bool = False) -> Rater:
        """A new rater, or the existing one of that name (a rater who comes back under the same name resumes)."""
        name = check_name(name)
        if not isinstance(simulated, bool):
            raise Unprocessable("simulated must be true or false")
        with self.store.write() as con:
            if name is not None:
                row = con.execute("SELECT rater_id, simulated FROM raters WHERE name = ?", (name,)).fetchone()
                if row is not None:
                    if bool(row[1]) != simulated:
                        raise Conflict(f"rater {name!r} exists as a {'simulated' if row[1] else 'human'} rater")
                    return Rater(row[0], name, bool(row[1]))
            rater_id = secrets.token_urlsafe(16)
            con.execute("INSERT INTO raters VALUES (?, ?, ?, ?)", (rater_id, name, int(simulated), time.time()))
        return Rater(rater_id, name, simulated)

    def rater(self, rater_id: Any) -> Rater:
        if rater_id is None or rater_id == "":
            raise Unauthorised("no rater: register first (POST /api/raters)")
        check_token(rater_id, "rater")
        with self.store.read() as con:
            row = con.execute("SELECT name, simulated FROM raters WHERE rater_id = ?", (rater_id,)).fetchone()
        if row is None:
            raise Unauthorised("unknown rater: register first (POST /api/raters)")
        return Rater(rater_id, row[0], bool(row[1]))

    def progress(self, rater_id: Any) -> tuple[int, int]:
        rater = self.rater(rater_id)
        with self.store.read() as con:
            done = con.execute("SELECT COUNT(*) FROM judgments WHERE rater_id = ?", (rater.rater_id,)).fetchone()[0]
        return done, self.total

    # ------------------------------------------------------------------------------------------------ pairs

    def next(self, rater_id: Any) -> Showing | None:
        """The rater's open showing, or a new one for their next unjudged item; None when they have judged all."""
        rater = self.rater(rater_id)
        with self.store.write() as con:
            done = con.execute("SELECT COUNT(*) FROM judgments WHERE rater_id = ?", (rater.rater_id,)).fetchone()[0]
            row = con.execute(
                "SELECT s.showing_id, s.item_id, s.a_left FROM showings s LEFT JOIN judgments j "
                "ON j.showing_id = s.showing_id WHERE s.rater_id = ? AND j.showing_id IS NULL "
                "ORDER BY s.shown_at LIMIT 1", (rater.rater_id,)).fetchone()
            if row is None:
                judged = {r[0] for r in con.execute("SELECT item_id FROM judgments WHERE rater_id = ?",
                                                    (rater.rater_id,))}
                # a named rater's order and sides follow the name: a seeded simulation replays exactly
                key = rater.name or rater.rater_id
                item = next((i for i in self._order(key) if i not in judged), None)
                if item is None:
                    return None
                row = (secrets.token_urlsafe(12), item, int(a_on_left(self.seed, key, item)))
                con.execute("INSERT INTO showings VALUES (?, ?, ?, ?, ?)",
                            (row[0], rater.rater_id, row[1], row[2], time.time()))
            showing_id, item_id, a_left = row
            prompt, image_a, image_b = con.execute(
                "SELECT p.text, i.image_a, i.image_b FROM items i JOIN prompts p ON p.prompt_id = i.prompt_id "
                "WHERE i.item_id = ?", (item_id,)).fetchone()
        left, right = (image_a, image_b) if a_left else (image_b, image_a)
        return Showing(showing_id, prompt, left, right, done, self.total)

    def vote(self, rater_id: Any, showing_id: Any, choice: Any) -> Ack:
        """Store the rater's choice for a showing (committed before this returns)."""
        rater = self.rater(rater_id)
        check_token(showing_id, "showing")
        choice = check_choice(choice)
        with self.store.write() as con:
            row = con.execute(
                "SELECT s.item_id, s.a_left, s.shown_at, i.system_a, i.system_b FROM showings s "
                "JOIN items i ON i.item_id = s.item_id WHERE s.showing_id = ? AND s.rater_id = ?",
                (showing_id, rater.rater_id)).fetchone()
            if row is None:
                raise NotFound("no such showing for this rater")
            item_id, a_left, shown_at, system_a, system_b = row
            old = con.execute("SELECT choice FROM judgments WHERE showing_id = ?", (showing_id,)).fetchone()
            if old is not None and old[0] != choice:
                raise Conflict(f"this pair was already answered with {old[0]!r}")
            if old is None:
                left, right = (system_a, system_b) if a_left else (system_b, system_a)
                con.execute("INSERT INTO judgments VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                            (showing_id, rater.rater_id, item_id, left, right, choice, shown_at, time.time(),
                             int(rater.simulated)))
            done = con.execute("SELECT COUNT(*) FROM judgments WHERE rater_id = ?", (rater.rater_id,)).fetchone()[0]
        return Ack(showing_id, choice, old is not None, done, self.total)

    def image(self, name: Any):
        """The file of ``<digest>.png`` inside the study's image folder (404 for anything else)."""
        if not isinstance(name, str) or not name.endswith(".png"):
            raise NotFound("no such image")
        path = self.store.image_path(name[:-4])
        if path is None:
            raise NotFound("no such image")
        return path
