"""Simulated raters with known preferences, so that the study runs (and is tested) without people.

The rater model (:class:`RaterModel`) is Davidson's Bradley–Terry model with ties, per rater:

* each compared system ``s`` has a population log-strength ``theta_s``; a rater sees it as ``theta_s + d_rs`` with
  ``d_rs ~ N(0, heterogeneity^2)`` (raters disagree), and adds ``b_r ~ N(position_bias, position_bias_sd^2)`` to
  whichever image is on the left (position bias);
* with ``u = (theta_L + d_rL + b_r) - (theta_R + d_rR)``: ``P(left) : P(neither) : P(right) =
  1 : nu_r exp(-u/2) : exp(-u)``, where the tie propensity ``nu_r`` is log-normal around ``tie``;
* noise: any answer is replaced by a uniformly random one with probability ``lapse``; a share ``careless`` of raters
  answer everything at random (the attention checks are there to find them);
* attention checks (ground truth against noise): an attentive rater picks the ground truth unless they lapse.

The truth a pooled Bradley–Terry fit recovers is not ``theta`` itself: rater heterogeneity, position bias and lapses
pull the pooled decisive win rates towards one half. :func:`population_strengths` computes the population's
Bradley–Terry strengths exactly as the fit defines them (expected decisive wins of attentive raters, over raters and
sides, by Monte Carlo with a fixed seed); that is the known truth the analysis must recover.

Clients: :func:`simulate_service` votes through ``service.StudyService`` in this process; :func:`simulate_http`
votes through the server's HTTP interface, one thread and one cookie jar per rater, concurrently, exactly as the page
does (it reads only the study's image-to-system table from the database, to know what it is looking at). Both mark
their raters and judgments simulated and record the model in the study's ``meta``. :func:`simulate_counts` draws
whole studies as arrays of per-rater counts (no database, no images) for coverage checks.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import choix
import httpx
import numpy as np

from .design import ATTENTION_NOISE, ATTENTION_TRUTH
from .service import StudyService
from .store import Store

CHOICES = ("left", "neither", "right")


@dataclass(frozen=True)
class RaterModel:
    """The simulated rater population (see the module docstring)."""

    strengths: Mapping[str, float]
    position_bias: float = 0.3
    position_bias_sd: float = 0.1
    tie: float = 0.3
    tie_sd: float = 0.5
    heterogeneity: float = 0.2
    careless: float = 0.05
    lapse: float = 0.03

    def __post_init__(self) -> None:
        if len(self.strengths) < 2:
            raise ValueError(f"a rater model needs the strengths of at least two systems, got {dict(self.strengths)}")
        for name in ("position_bias_sd", "tie", "tie_sd", "heterogeneity"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("careless", "lapse"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")

    @property
    def systems(self) -> list[str]:
        return list(self.strengths)

    def describe(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "strengths": dict(self.strengths)}


def even_strengths(systems: Sequence[str], gap: float = 0.5) -> dict[str, float]:
    """Strengths ``gap`` apart in the systems' order (the first strongest), centred on zero."""
    n = len(systems)
    return {s: gap * ((n - 1) / 2 - k) for k, s in enumerate(systems)}


def parse_strengths(text: str, systems: Sequence[str], gap: float = 0.5) -> dict[str, float]:
    """``"name:value,name:value"`` (or ``=``) for every compared system ("": :func:`even_strengths`)."""
    if not text.strip():
        return even_strengths(systems, gap)
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.rpartition("=" if "=" in part else ":")
        if not sep:
            raise ValueError(f"strengths must read name:value,name:value; got {part!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ValueError(f"strength of {name.strip()!r} must be a number, got {value!r}") from None
    missing, unknown = sorted(set(systems) - set(out)), sorted(set(out) - set(systems))
    if missing or unknown:
        raise ValueError(f"strengths must name every compared system {list(systems)} (missing {missing}, "
                         f"unknown {unknown})")
    return {s: out[s] for s in systems}


@dataclass
class RaterDraws:
    """Parameters of ``n`` simulated raters: deviations (n, S), position bias (n,), tie propensity (n,), careless."""

    deviation: np.ndarray
    bias: np.ndarray
    nu: np.ndarray
    careless: np.ndarray


def draw_raters(model: RaterModel, n: int, rng: np.random.Generator, attentive: bool = False) -> RaterDraws:
    s = len(model.strengths)
    return RaterDraws(deviation=rng.normal(0.0, model.heterogeneity, (n, s)),
                      bias=rng.normal(model.position_bias, model.position_bias_sd, n),
                      nu=model.tie * np.exp(rng.normal(0.0, model.tie_sd, n)),
                      careless=np.zeros(n, bool) if attentive else rng.random(n) < model.careless)


def probabilities(model: RaterModel, draws: RaterDraws, rater: np.ndarray, left: np.ndarray,
                  right: np.ndarray) -> np.ndarray:
    """``P(left), P(neither), P(right)`` (..., 3) for raters ``rater`` shown systems ``left`` / ``right`` (indices
    into the model's systems); lapses and careless raters included."""
    theta = np.asarray(list(model.strengths.values()), dtype=np.float64)
    u = theta[left] + draws.deviation[rater, left] + draws.bias[rater] - theta[right] - draws.deviation[rater, right]
    u = np.clip(u, -30, 30)
    weights = np.stack([np.ones_like(u), draws.nu[rater] * np.exp(-u / 2), np.exp(-u)], axis=-1)
    p = weights / weights.sum(-1, keepdims=True)
    noise = np.where(draws.careless[rater], 1.0, model.lapse)[..., None]
    return (1 - noise) * p + noise / 3


def population_strengths(model: RaterModel, n: int = 200_000, seed: int = 0) -> dict[str, float]:
    """The Bradley–Terry strengths that a pooled fit of attentive raters' decisive judgments estimates (balanced
    pairs and sides): the choix fit of the expected decisive wins, by Monte Carlo over ``n`` raters."""
    rng = np.random.default_rng([seed, 7])
    draws = draw_raters(model, n, rng, attentive=True)
    s = len(model.strengths)
    rater = np.arange(n)
    wins = np.zeros((s, s))
    for i in range(s):
        for j in range(s):
            if i != j:  # i on the left against j, then j on the left against i: both sides equally often
                p_left = probabilities(model, draws, rater, np.full(n, i), np.full(n, j))
                wins[i, j] += p_left[:, 0].mean()
                wins[j, i] += p_left[:, 2].mean()
    fitted = choix.ilsr_pairwise_dense(wins * 1000.0, alpha=0.0)  # the scale of expected counts does not matter
    return {name: float(v) for name, v in zip(model.strengths, fitted - fitted.mean())}


def vote_counts(n_raters: int, votes: int, spread: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Comparisons each rater makes: ``votes`` each (``spread`` 0), or log-normal around a mean of ``votes`` with
    log-SD ``spread`` (a few raters make many, many make few, as in the paper's Figure 5 c, d); 1 to ``cap``."""
    if spread <= 0:
        return np.full(n_raters, min(votes, cap))
    n = votes * np.exp(rng.normal(-spread ** 2 / 2, spread, n_raters))
    return np.clip(np.round(n), 1, cap).astype(int)


@dataclass
class ImageIndex:
    """What a simulated rater knows when it looks at a prompt and an image: which compared system (or attention
    image) made it. Keyed by prompt and image, since one image may serve several prompts (another prompt's render)."""

    systems: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # (prompt, digest) -> system names

    @classmethod
    def of(cls, store: Store) -> "ImageIndex":
        index: dict[tuple[str, str], set[str]] = {}
        with store.read() as con:
            for text, system, digest in con.execute(
                    "SELECT p.text, i.system, i.digest FROM images i JOIN prompts p ON p.prompt_id = i.prompt_id"):
                index.setdefault((text, digest), set()).add(system)
        return cls(index)

    def _names(self, prompt: str, url_or_digest: str) -> set[str]:
        return self.systems.get((prompt, url_or_digest.rsplit("/", 1)[-1].removesuffix(".png")), set())

    def attention_side(self, prompt: str, left: str, right: str) -> str | None:
        """"left"/"right": where the ground truth of an attention check is; None for a compared pair."""
        lft, rgt = self._names(prompt, left), self._names(prompt, right)
        if ATTENTION_NOISE in rgt and ATTENTION_NOISE not in lft:
            return "left"
        if ATTENTION_NOISE in lft and ATTENTION_NOISE not in rgt:
            return "right"
        return None

    def system(self, prompt: str, url_or_digest: str, systems: Sequence[str]) -> int:
        names = self._names(prompt, url_or_digest) - {ATTENTION_TRUTH, ATTENTION_NOISE}
        found = [k for k, s in enumerate(systems) if s in names]
        if not found:
            raise ValueError(f"image {url_or_digest} belongs to none of the simulated systems {list(systems)}")
        return found[0]


class SimulatedRater:
    """One rater drawn from the model: answers a showing (the prompt, two image URLs or digests) with a choice."""

    def __init__(self, model: RaterModel, draws: RaterDraws, k: int, index: ImageIndex, rng: np.random.Generator):
        self.model, self.draws, self.k, self.index, self.rng = model, draws, k, index, rng

    def choose(self, prompt: str, left: str, right: str) -> str:
        side = self.index.attention_side(prompt, left, right)
        if side is not None:
            noise = 1.0 if self.draws.careless[self.k] else self.model.lapse
            return str(self.rng.choice(CHOICES)) if self.rng.random() < noise else side
        systems = self.model.systems
        p = probabilities(self.model, self.draws, np.array(self.k), np.array(self.index.system(prompt, left, systems)),
                          np.array(self.index.system(prompt, right, systems)))
        return CHOICES[int(self.rng.choice(3, p=p))]


def _record(store: Store, model: RaterModel, seed: int, target: dict[str, float], transport: str) -> None:
    meta = store.meta()
    runs = list(meta.get("simulation_runs", []))
    runs.append({"seed": seed, "transport": transport, "time": time.strftime("%Y-%m-%d %H:%M:%S")})
    store.set_meta(simulated=True, simulation={"model": model.describe(), "population_strengths": target},
                   simulation_runs=runs)


def _raters(model: RaterModel, store: Store, n_raters: int, votes: int, spread: float, seed: int,
            ) -> tuple[list[SimulatedRater], np.ndarray]:
    rng = np.random.default_rng([seed, 1])
    draws = draw_raters(model, n_raters, rng)
    total = store.counts()["items"]
    counts = vote_counts(n_raters, votes, spread, total, rng)
    index = ImageIndex.of(store)
    raters = [SimulatedRater(model, draws, k, index, np.random.default_rng([seed, 2, k])) for k in range(n_raters)]
    return raters, counts


def check_model(store: Store, model: RaterModel) -> None:
    compared = [s for s in store.meta().get("systems", [])]
    missing = sorted(set(compared) - set(model.strengths))
    if missing:
        raise ValueError(f"the rater model gives no strength to the study's systems {missing}")


def simulate_service(store: Store, model: RaterModel, n_raters: int, votes: int, spread: float = 0.0,
                     seed: int = 0, prefix: str = "sim") -> dict[str, Any]:
    """Simulated raters voting through the service layer in this process (the store opened without per-commit
    syncing: simulated votes need no protection from power cuts). Returns counts."""
    check_model(store, model)
    fast = Store(store.path, durable=False)
    service = StudyService(fast)
    raters, counts = _raters(model, store, n_raters, votes, spread, seed)
    target = population_strengths(model, seed=seed)
    stored = 0
    for k, (rater, n) in enumerate(zip(raters, counts)):
        who = service.register(f"{prefix}-{seed}-{k:03d}", simulated=True)
        for _ in range(int(n)):
            showing = service.next(who.rater_id)
            if showing is None:
                break
            service.vote(who.rater_id, showing.showing_id, rater.choose(showing.prompt, showing.left, showing.right))
            stored += 1
    _record(store, model, seed, target, "service")
    return {"raters": n_raters, "judgments": stored, "population_strengths": target}


def simulate_http(url: str, store: Store, model: RaterModel, n_raters: int, votes: int, spread: float = 0.0,
                  seed: int = 0, prefix: str = "sim-http", timeout: float = 30.0,
                  on_ack: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Simulated raters voting concurrently over HTTP (one thread, one client and one cookie jar each), as the page
    does: register, then ``GET /api/next`` and ``POST /api/vote`` until their count is reached. A rater whose
    connection fails stops and reports it (the others go on). ``on_ack`` sees every acknowledged showing id.
    Returns the acknowledged showing ids and the errors."""
    check_model(store, model)
    raters, counts = _raters(model, store, n_raters, votes, spread, seed)
    acked: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def play(k: int) -> None:
        rater, n = raters[k], int(counts[k])
        try:
            with httpx.Client(base_url=url, timeout=timeout) as client:
                r = client.post("/api/raters", json={"name": f"{prefix}-{seed}-{k:03d}", "simulated": True})
                r.raise_for_status()
                for _ in range(n):
                    r = _retrying(lambda: client.get("/api/next"))
                    data = r.json()
                    if data.get("finished"):
                        break
                    choice = rater.choose(data["prompt"], data["left"], data["right"])
                    r = _retrying(lambda: client.post("/api/vote", json={"showing": data["showing"], "choice": choice}))
                    if r.json().get("ok"):
                        with lock:
                            acked.append(data["showing"])
                        if on_ack is not None:
                            on_ack(data["showing"])
        except (httpx.HTTPError, ValueError, KeyError) as e:
            with lock:
                errors.append(f"rater {k}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=play, args=(k,), daemon=True) for k in range(n_raters)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target = population_strengths(model, seed=seed)
    _record(store, model, seed, target, "http")
    return {"raters": n_raters, "acknowledged": acked, "errors": errors, "population_strengths": target}


def _retrying(request: Callable[[], httpx.Response], tries: int = 20) -> httpx.Response:
    """A request retried while the server answers 503 (database busy); any other error status raises."""
    for _ in range(tries):
        response = request()
        if response.status_code != 503:
            response.raise_for_status()
            return response
        time.sleep(0.05)
    response.raise_for_status()
    return response


# ----------------------------------------------------------------------------------- whole studies as arrays

def simulate_counts(model: RaterModel, n_studies: int, n_raters: int, votes: int, seed: int = 0,
                    attentive: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``n_studies`` studies of ``n_raters`` raters with ``votes`` judgments each on uniformly drawn system pairs and
    sides: per-rater decisive wins ``(K, R, S, S)`` (``[.., i, j]``: i chosen over j) and ties ``(K, R, S, S)``
    (symmetric). No database and no images: the statistics' behaviour over many studies, in seconds."""
    s = len(model.strengths)
    rng = np.random.default_rng([seed, 3])
    k, r, v = n_studies, n_raters, votes
    draws = draw_raters(model, k * r, rng, attentive=attentive)
    pairs = np.array([(i, j) for i in range(s) for j in range(s) if i < j])
    chosen = pairs[rng.integers(0, len(pairs), (k * r, v))]
    swap = rng.random((k * r, v)) < 0.5
    left = np.where(swap, chosen[..., 1], chosen[..., 0])
    right = np.where(swap, chosen[..., 0], chosen[..., 1])
    rater = np.broadcast_to(np.arange(k * r)[:, None], (k * r, v))
    p = probabilities(model, draws, rater, left, right)
    u = rng.random((k * r, v, 1))
    outcome = (u > np.cumsum(p, -1)).sum(-1)  # 0 left, 1 neither, 2 right
    winner = np.where(outcome == 0, left, right)
    loser = np.where(outcome == 0, right, left)
    base = np.arange(k * r)[:, None] * s * s
    decisive = outcome != 1
    wins = np.bincount((base + winner * s + loser)[decisive], minlength=k * r * s * s).reshape(k, r, s, s)
    tie_index = (base + left * s + right)[~decisive]
    ties = np.bincount(tie_index, minlength=k * r * s * s).reshape(k, r, s, s)
    return wins.astype(np.float64), (ties + ties.transpose(0, 1, 3, 2)).astype(np.float64)
