"""The rating server over real HTTP (uvicorn in a child process on a free loopback port): bad requests get a 4xx
and write nothing, 16 concurrent raters store exactly their 800 votes, and a SIGKILL mid-study loses no acknowledged
vote."""
from __future__ import annotations

import os
import signal
import threading

import httpx
import numpy as np
import pytest

from wurst_core.human import simulate as sim
from wurst_core.human.build import Prompt, SystemImages, build_study
from wurst_core.human.design import DesignSpec
from wurst_core.human.server import running, spawn, stop
from wurst_core.human.store import Store

SYSTEMS = ["A", "B", "C"]
MODEL = sim.RaterModel({"A": 0.5, "B": 0.0, "C": -0.5})


def make_study(path, n_prompts=20):
    """3 systems x 20 prompts x 3 pairs = 60 pairs, + 6 attention checks + 6 repeats: 72 items per rater."""
    rng = np.random.default_rng(0)
    prompts = [Prompt(f"prompt {i}", "novel" if i % 2 else "seen") for i in range(n_prompts)]
    systems = [SystemImages(s, rng.random((n_prompts, 3, 8, 8))) for s in SYSTEMS]
    attention = (SystemImages("t", rng.random((n_prompts, 3, 8, 8))),
                 SystemImages("n", rng.random((n_prompts, 3, 8, 8))))
    return build_study(path, prompts, systems, DesignSpec(3, 0.1, 0.1, 0), attention)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    store = make_study(tmp_path_factory.mktemp("server") / "study.sqlite")
    with running(store.path) as url:
        yield store, url


def test_bad_requests_get_a_4xx_with_a_message_and_write_nothing(server):
    store, url = server
    before = store.counts()
    statuses = {}
    with httpx.Client(base_url=url, timeout=30) as anonymous, httpx.Client(base_url=url, timeout=30) as c:
        assert anonymous.get("/").status_code == 200
        statuses["vote without rater"] = anonymous.post("/api/vote", json={"showing": "x", "choice": "left"})
        statuses["next without rater"] = anonymous.get("/api/next")
        statuses["unknown rater"] = anonymous.get("/api/next", headers={"X-Rater": "not-a-rater"})
        statuses["malformed rater id"] = anonymous.get("/api/next", headers={"X-Rater": "../../etc"})
        statuses["name too long"] = anonymous.post("/api/raters", json={"name": "x" * 100})
        statuses["name not a string"] = anonymous.post("/api/raters", json={"name": ["x"]})
        statuses["simulated not a boolean"] = anonymous.post("/api/raters", json={"simulated": "yes"})
        assert c.post("/api/raters", json={"name": "tester"}).status_code == 200
        shown = c.get("/api/next").json()
        assert set(shown) == {"showing", "prompt", "left", "right", "done", "total"}
        assert not any(s in (shown["left"] + shown["right"]) for s in SYSTEMS + ["system"])
        statuses["unknown showing"] = c.post("/api/vote", json={"showing": "abcdef", "choice": "left"})
        statuses["malformed showing"] = c.post("/api/vote", json={"showing": "a/b", "choice": "left"})
        statuses["missing showing"] = c.post("/api/vote", json={"choice": "left"})
        statuses["invalid choice"] = c.post("/api/vote", json={"showing": shown["showing"], "choice": "both"})
        statuses["choice not a string"] = c.post("/api/vote", json={"showing": shown["showing"], "choice": 1})
        json_type = {"content-type": "application/json"}
        statuses["malformed JSON"] = c.post("/api/vote", content=b'{"showing": ', headers=json_type)
        statuses["not UTF-8"] = c.post("/api/vote", content=b"\xff\xfe\x00", headers=json_type)
        statuses["JSON not an object"] = c.post("/api/vote", json=[shown["showing"], "left"])
        statuses["oversized body"] = c.post("/api/vote", json={"showing": shown["showing"], "choice": "left",
                                                               "pad": "x" * 100_000})
        statuses["oversized streamed body"] = c.post("/api/vote", content=(b"x" * 8192 for _ in range(8)))
        statuses["wrong method"] = c.get("/api/vote")
        statuses["unknown route"] = c.get("/api/delete_everything")
        statuses["path outside the store"] = c.get("/images/..%2F..%2Fstudy.sqlite")
        statuses["dot-dot image name"] = c.get("/images/%2e%2e")
        statuses["database as image"] = c.get("/images/study.sqlite")
        statuses["unknown digest"] = c.get(f"/images/{'0' * 64}.png")
        statuses["digest without suffix"] = c.get(f"/images/{shown['left'].split('/')[-1][:-4]}")
        with httpx.Client(base_url=url, timeout=30) as other:
            other.post("/api/raters", json={"name": "other"})
            statuses["another rater's showing"] = other.post("/api/vote", json={"showing": shown["showing"],
                                                                                "choice": "left"})
        report = {k: (r.status_code, r.json().get("error")) for k, r in statuses.items()}
        print(report)
        assert all(400 <= code < 500 for code, _ in report.values()), report
        assert all(isinstance(message, str) and message for _, message in report.values()), report
        assert report["oversized body"][0] == 413 and report["oversized streamed body"][0] == 413
        assert report["invalid choice"][0] == 422 and report["unknown showing"][0] == 404
        after = store.counts()
        assert after["judgments"] == before["judgments"] and after["raters"] == before["raters"] + 2
        # the image itself is served, and a good vote is stored once however often it is sent
        assert c.get(shown["left"]).content[:4] == b"\x89PNG"
        first = c.post("/api/vote", json={"showing": shown["showing"], "choice": "left"}).json()
        second = c.post("/api/vote", json={"showing": shown["showing"], "choice": "left"}).json()
        assert first["ok"] and not first["duplicate"] and second["duplicate"] and second["done"] == 1
        assert c.post("/api/vote", json={"showing": shown["showing"], "choice": "right"}).status_code == 409
        assert store.counts()["judgments"] == before["judgments"] + 1


def test_16_raters_voting_concurrently_store_exactly_800_judgments(server):
    store, url = server
    out = sim.simulate_http(url, store, MODEL, n_raters=16, votes=50, seed=11, prefix="load")
    assert out["errors"] == []
    acked = out["acknowledged"]
    j = store.table("judgments").merge(store.table("raters")[["rater_id", "name"]], on="rater_id")
    mine = j[j["name"].str.startswith("load-")]
    print(f"concurrency: {len(acked)} votes acknowledged, {len(mine)} stored, "
          f"{mine['showing_id'].nunique()} distinct showings, per rater {sorted(set(mine.groupby('name').size()))}")
    assert len(acked) == len(set(acked)) == 800
    assert len(mine) == 800 and set(mine["showing_id"]) == set(acked)
    assert (mine.groupby("name").size() == 50).all() and mine.groupby("name").size().size == 16
    assert not mine.duplicated(["rater_id", "item_id"]).any()
    assert mine["simulated"].all() and store.meta()["simulated"] is True
    assert store.integrity() == "ok"


def test_sigkill_mid_study_keeps_every_acknowledged_vote(tmp_path):
    store = make_study(tmp_path / "study.sqlite")
    proc, url = spawn(store.path)
    acked: list[str] = []
    killed = threading.Event()

    def on_ack(showing: str) -> None:
        acked.append(showing)
        if len(acked) >= 120 and not killed.is_set():
            killed.set()
            os.kill(proc.pid, signal.SIGKILL)

    try:
        out = sim.simulate_http(url, store, MODEL, n_raters=8, votes=40, seed=5, prefix="kill", on_ack=on_ack,
                                timeout=10)
    finally:
        stop(proc, kill=True)
    assert killed.is_set() and proc.returncode == -signal.SIGKILL
    assert out["errors"], "the kill should have cut some raters off"
    # restart on the same database, and check every acknowledged vote
    proc, url = spawn(store.path)
    try:
        stored = set(Store(store.path).table("judgments")["showing_id"])
        missing = set(out["acknowledged"]) - stored
        print(f"kill: {len(out['acknowledged'])} votes acknowledged before SIGKILL, {len(stored)} stored after the "
              f"restart, {len(missing)} acknowledged votes missing; {len(out['errors'])} raters cut off")
        assert not missing and len(out["acknowledged"]) >= 120
        assert Store(store.path).integrity() == "ok"
        again = sim.simulate_http(url, store, MODEL, n_raters=2, votes=5, seed=6, prefix="after")
        assert again["errors"] == [] and len(again["acknowledged"]) == 10
        # a cut-off rater comes back under the same name and goes on where they stopped
        resumed = sim.simulate_http(url, store, MODEL, n_raters=1, votes=3, seed=5, prefix="kill")
        assert resumed["errors"] == [] and len(resumed["acknowledged"]) == 3
    finally:
        stop(proc)
