"""The study's store: one SQLite database in WAL mode and a content-addressed image folder beside it.

Tables (``SCHEMA``): ``meta`` (the study's description, as JSON values), ``systems``, ``prompts``, ``images`` (which
system made which image for which prompt, by the image's SHA-256, with the automated judges' scores), ``items`` (the
design: the pairs to show), ``raters``, ``showings`` (an item shown to a rater, with its side assignment) and
``judgments`` (rater, item, which system was on the left and which on the right, choice, shown-at and answered-at
times, simulated or not). A judgment's key is its showing: a second submit of the same showing cannot add a row.

Durability: every write is one ``BEGIN IMMEDIATE`` transaction, committed before the caller answers anyone. In WAL
mode a committed transaction survives the process being killed; ``durable=True`` (the server's default) also syncs
the log at every commit (``synchronous=FULL``), so that a power cut loses no acknowledged vote either.

Images: ``<db stem>_images/<2 hex>/<sha256>.png``. Their names say nothing about the system that made them, and
:meth:`Store.image_path` only ever resolves a well-formed digest that the database knows to a file inside that folder.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pandas as pd

FORMAT = "wurst-human-study/1"
CHOICES = ("left", "right", "neither")
ITEM_KINDS = ("pair", "attention", "repeat")
DIGEST = re.compile(r"^[0-9a-f]{64}$")

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE systems (
    name TEXT PRIMARY KEY, position INTEGER NOT NULL, role TEXT NOT NULL CHECK (role IN ('compared', 'attention')),
    description TEXT NOT NULL DEFAULT '');
CREATE TABLE prompts (
    prompt_id INTEGER PRIMARY KEY, prompt_set TEXT NOT NULL, text TEXT NOT NULL, truth TEXT);
CREATE TABLE images (
    system TEXT NOT NULL REFERENCES systems(name), prompt_id INTEGER NOT NULL REFERENCES prompts(prompt_id),
    digest TEXT NOT NULL, judge_score REAL, attribute_score REAL, PRIMARY KEY (system, prompt_id));
CREATE TABLE items (
    item_id TEXT PRIMARY KEY, position INTEGER NOT NULL UNIQUE,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'attention', 'repeat')),
    prompt_id INTEGER NOT NULL REFERENCES prompts(prompt_id),
    system_a TEXT NOT NULL, system_b TEXT NOT NULL, image_a TEXT NOT NULL, image_b TEXT NOT NULL,
    repeat_of TEXT REFERENCES items(item_id));
CREATE TABLE raters (
    rater_id TEXT PRIMARY KEY, name TEXT UNIQUE, simulated INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL);
CREATE TABLE showings (
    showing_id TEXT PRIMARY KEY, rater_id TEXT NOT NULL REFERENCES raters(rater_id),
    item_id TEXT NOT NULL REFERENCES items(item_id), a_left INTEGER NOT NULL, shown_at REAL NOT NULL);
CREATE INDEX showings_by_rater ON showings (rater_id);
CREATE TABLE judgments (
    showing_id TEXT PRIMARY KEY REFERENCES showings(showing_id),
    rater_id TEXT NOT NULL REFERENCES raters(rater_id), item_id TEXT NOT NULL REFERENCES items(item_id),
    left_system TEXT NOT NULL, right_system TEXT NOT NULL,
    choice TEXT NOT NULL CHECK (choice IN ('left', 'right', 'neither')),
    shown_at REAL NOT NULL, answered_at REAL NOT NULL, simulated INTEGER NOT NULL DEFAULT 0);
CREATE INDEX judgments_by_rater ON judgments (rater_id);
"""
TABLES = ("meta", "systems", "prompts", "images", "items", "raters", "showings", "judgments")


class Store:
    """An existing study database (see :meth:`create` for a new one). Cheap to construct: every operation opens
    its own connection, so one ``Store`` may serve many threads."""

    def __init__(self, path: str | os.PathLike, durable: bool = True) -> None:
        self.path = Path(path).resolve()
        self.durable = durable
        self._local = threading.local()
        if not self.path.is_file():
            raise FileNotFoundError(f"no study database at {self.path} (make one with `wurst study create`)")
        with self.read() as con:
            try:
                row = con.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{self.path} is not a study database ({e})") from None
        if row is None or json.loads(row[0]) != FORMAT:
            raise ValueError(f"{self.path} is not a study database of format {FORMAT}")

    @classmethod
    def create(cls, path: str | os.PathLike) -> "Store":
        """A new, empty study database (WAL mode); refuses to overwrite an existing file."""
        path = Path(path).resolve()
        if path.exists():
            raise FileExistsError(f"{path} exists; a study is created once (choose another --db)")
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.executescript("BEGIN;" + SCHEMA + "COMMIT;")
            con.execute("INSERT INTO meta VALUES ('format', ?)", (json.dumps(FORMAT),))
            con.execute("INSERT INTO meta VALUES ('created', ?)", (json.dumps(time.strftime("%Y-%m-%d %H:%M:%S")),))
        finally:
            con.close()
        return cls(path)

    # ----------------------------------------------------------------------------------------- connections

    def connect(self) -> sqlite3.Connection:
        """This thread's connection (opened once per thread and store: opening costs more than a vote)."""
        con = getattr(self._local, "con", None)
        if con is None or getattr(self._local, "pid", None) != os.getpid():
            con = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            con.execute("PRAGMA busy_timeout = 60000")
            con.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
            con.execute("PRAGMA foreign_keys = ON")
            self._local.con, self._local.pid = con, os.getpid()
        return con

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        yield self.connect()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``: writers queue instead of failing later) and
        committed when the block ends, before anyone is told it succeeded; rolled back on any error."""
        con = self.connect()
        con.execute("BEGIN IMMEDIATE")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")

    # ------------------------------------------------------------------------------------------------- meta

    def meta(self) -> dict[str, Any]:
        with self.read() as con:
            return {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta")}

    def set_meta(self, **values: Any) -> None:
        with self.write() as con:
            con.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v, sort_keys=True)) for k, v in values.items()])

    # ----------------------------------------------------------------------------------------------- images

    @property
    def images_dir(self) -> Path:
        return self.path.with_name(f"{self.path.stem}_images")

    def put_image(self, png: bytes) -> str:
        """Store PNG bytes under their SHA-256 (written atomically, once); returns the digest."""
        digest = hashlib.sha256(png).hexdigest()
        target = self.images_dir / digest[:2] / f"{digest}.png"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(png)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        return digest

    def image_path(self, digest: str) -> Path | None:
        """The file of a stored image, or None: only a 64-hex digest that the study's items show, and only a file
        inside the image folder (never a path the request spells)."""
        if not isinstance(digest, str) or not DIGEST.match(digest):
            return None
        with self.read() as con:
            known = con.execute("SELECT 1 FROM items WHERE image_a = ? OR image_b = ? LIMIT 1",
                                (digest, digest)).fetchone()
        if known is None:
            return None
        root = self.images_dir.resolve()
        path = (root / digest[:2] / f"{digest}.png").resolve()
        if root not in path.parents or not path.is_file():
            return None
        return path

    # ---------------------------------------------------------------------------------------------- reading

    def table(self, name: str) -> pd.DataFrame:
        if name not in TABLES:
            raise ValueError(f"no table {name!r}; the study has {list(TABLES)}")
        with self.read() as con:
            return pd.read_sql_query(f"SELECT * FROM {name}", con)

    def counts(self) -> dict[str, int]:
        with self.read() as con:
            return {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in TABLES}

    def integrity(self) -> str:
        with self.read() as con:
            return con.execute("PRAGMA integrity_check").fetchone()[0]

    def export_csv(self, out_dir: str | os.PathLike) -> list[Path]:
        """Every table as ``<table>.csv`` in ``out_dir``; judgments joined with their item and prompt."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for name in TABLES:
            path = out / f"{name}.csv"
            self.table(name).to_csv(path, index=False)
            written.append(path)
        path = out / "judgments_joined.csv"
        with self.read() as con:
            pd.read_sql_query(JOINED, con).to_csv(path, index=False)
        written.append(path)
        return written


# every judgment with its item's design and prompt (the analysis reads this)
JOINED = """
SELECT j.showing_id, j.rater_id, r.name AS rater_name, r.simulated AS rater_simulated, j.item_id, i.kind,
       i.repeat_of, i.prompt_id, p.prompt_set, p.text AS prompt, i.system_a, i.system_b, j.left_system,
       j.right_system, j.choice, j.shown_at, j.answered_at, j.simulated, r.created_at AS rater_created
FROM judgments j JOIN items i ON i.item_id = j.item_id JOIN prompts p ON p.prompt_id = i.prompt_id
JOIN raters r ON r.rater_id = j.rater_id
ORDER BY r.created_at, r.rater_id, j.answered_at, j.showing_id
"""


def judgments(store: Store) -> pd.DataFrame:
    """Every judgment joined with its item and prompt (see ``JOINED``)."""
    with store.read() as con:
        return pd.read_sql_query(JOINED, con)
