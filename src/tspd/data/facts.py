"""The facts dataset (SPEC §6.3): well-known athletes of several sports and prompt templates whose
correct continuation is the athlete's sport. The data ship with tspd in `facts.json`.

Example:
    >>> from tspd.data.facts import load_facts
    >>> facts = load_facts()
    >>> facts.sport("golf").athletes[0].name, facts.sport("golf").answer
    ('Tiger Woods', ' golf')
    >>> p = facts.prompts()[0]
    >>> p.text, p.answer
    ('Michael Jordan plays the sport of', ' basketball')
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

FACTS_FILE = Path(__file__).with_name("facts.json")


@dataclass(frozen=True)
class Athlete:
    first: str
    last: str
    sport: str

    @property
    def name(self) -> str:
        return f"{self.first} {self.last}"


@dataclass(frozen=True)
class Sport:
    name: str
    answer: str  # the continuation scored after a template, with its leading space
    athletes: tuple[Athlete, ...]


@dataclass(frozen=True)
class FactPrompt:
    text: str
    athlete: Athlete
    template: str
    answer: str


@dataclass(frozen=True)
class Facts:
    sports: tuple[Sport, ...]
    templates: tuple[str, ...]

    @property
    def athletes(self) -> list[Athlete]:
        return [a for s in self.sports for a in s.athletes]

    @property
    def answers(self) -> dict[str, str]:
        """Sport name -> answer string."""
        return {s.name: s.answer for s in self.sports}

    def sport(self, name: str) -> Sport:
        for s in self.sports:
            if s.name == name:
                return s
        raise KeyError(f"no sport {name!r} in the facts; sports: {', '.join(s.name for s in self.sports)}")

    def prompts(self, templates: list[str] | tuple[str, ...] | None = None,
                athletes: list[Athlete] | None = None) -> list[FactPrompt]:
        """Every (athlete, template) prompt, athlete-major; by default all athletes and templates."""
        answers = self.answers
        return [
            FactPrompt(t.format(name=a.name), a, t, answers[a.sport])
            for a in (self.athletes if athletes is None else athletes)
            for t in (self.templates if templates is None else templates)
        ]


def _check(raw: dict, path: Path) -> None:
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a facts file is a JSON object with keys templates and sports (and optionally about)")
    unknown = set(raw) - {"about", "templates", "sports"}
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}; expected about, templates, sports")
    missing = {"templates", "sports"} - set(raw)
    if missing:
        raise ValueError(f"{path}: missing key(s) {', '.join(sorted(missing))}; a facts file needs templates and sports")
    for s in raw["sports"]:
        if not {"name", "answer", "athletes"} <= set(s):
            raise ValueError(f"{path}: each sport needs name, answer and athletes; got keys {', '.join(sorted(s))}")
    for t in raw["templates"]:
        if t.count("{name}") != 1:
            raise ValueError(f"{path}: template {t!r} must hold {{name}} exactly once")
    seen: set[str] = set()
    for s in raw["sports"]:
        if not s["answer"].startswith(" "):
            raise ValueError(f"{path}: answer {s['answer']!r} of {s['name']} needs a leading space (it follows a word)")
        for name in s["athletes"]:
            if " " not in name.strip():
                raise ValueError(f"{path}: athlete {name!r} ({s['name']}) needs a first and a last name")
            if name in seen:
                raise ValueError(f"{path}: athlete {name!r} is listed twice")
            seen.add(name)


def load_facts(path: str | Path | None = None) -> Facts:
    """The facts dataset: the shipped `facts.json`, or a file of the same layout."""
    path = FACTS_FILE if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"facts file {path} does not exist; give a JSON laid out like {FACTS_FILE}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); a facts file is laid out like {FACTS_FILE}") from None
    _check(raw, path)
    sports = tuple(
        Sport(s["name"], s["answer"], tuple(Athlete(*n.strip().split(" ", 1), sport=s["name"]) for n in s["athletes"]))
        for s in raw["sports"]
    )
    return Facts(sports, tuple(raw["templates"]))


def split_athletes(facts: Facts, heldout_fraction: float = 1 / 3, seed: int = 0) -> tuple[list[Athlete], list[Athlete]]:
    """(discovery, held-out) athletes: a seeded shuffle within each sport, the last
    round(heldout_fraction * n) of each sport held out. Subcomponents are chosen on discovery
    athletes and judged on held-out ones, which also never appear in decomposition data."""
    import random

    rng = random.Random(seed)
    discovery, heldout = [], []
    for sport in facts.sports:
        athletes = list(sport.athletes)
        rng.shuffle(athletes)
        n_held = round(heldout_fraction * len(athletes))
        discovery += athletes[: len(athletes) - n_held]
        heldout += athletes[len(athletes) - n_held :]
    return discovery, heldout


def fact_sentences(facts: Facts, athletes: list[Athlete] | None = None) -> list[str]:
    """Every (athlete, template) prompt completed with its answer and a full stop: training text."""
    return [p.text + p.answer + "." for p in facts.prompts(athletes=athletes)]
