"""Fixtures shared by the test files."""

import random

import pytest

SUBJECTS = ["the king", "a fool", "my lord", "the queen", "this night", "the ghost", "our army", "her father"]
VERBS = ["speaks of", "remembers", "betrays", "follows", "fears", "loves", "commands", "forgets"]
OBJECTS = ["the crown", "his brother", "the sea", "a letter", "the tower", "sweet music", "the field", "old debts"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small text file of grammatical sentences, enough for the smoke preset's batches."""
    rng = random.Random(0)
    lines = [
        f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)}."
        for _ in range(6000)
    ]
    path = tmp_path_factory.mktemp("corpus") / "plays.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """A temporary folder for results and caches, with no tracking or storage URL from the environment."""
    monkeypatch.setenv("N4_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("N4_OPTUNA_STORAGE", raising=False)
    return tmp_path
