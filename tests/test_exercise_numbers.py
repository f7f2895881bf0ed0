"""Exercises are numbered per chapter: the Sphinx extension restarts the count in every document."""

import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "_ext"))
from exercise_numbers import renumber  # noqa: E402


def test_numbers_restart_at_one_in_every_document_and_keep_their_order():
    numbers = {  # what Sphinx assigns without a numbered toctree: one count for the whole book
        "notebooks/01_kv_cache": {
            "exercise": {"ex-01-a": (1,), "ex-01-b": (2,)},
            "figure": {"f": (1,)},
        },
        "notebooks/05_paged_attention": {
            "exercise": {"ex-05-b": (13,), "ex-05-a": (12,), "ex-05-c": (14,)}
        },
        "book/intro": {},
    }
    renumber(numbers)
    assert numbers["notebooks/05_paged_attention"]["exercise"] == {
        "ex-05-a": (1,),
        "ex-05-b": (2,),
        "ex-05-c": (3,),
    }
    assert numbers["notebooks/01_kv_cache"]["exercise"] == {"ex-01-a": (1,), "ex-01-b": (2,)}
    assert numbers["notebooks/01_kv_cache"]["figure"] == {"f": (1,)}, "other kinds untouched"
    renumber(numbers)  # idempotent: a rebuild renumbers to the same
    assert numbers["notebooks/05_paged_attention"]["exercise"]["ex-05-c"] == (3,)


def test_the_book_loads_the_extension():
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    assert config["sphinx"]["local_extensions"]["exercise_numbers"] == "_ext/"
