"""Sampling parameters end to end (seed, greedy equivalents, stops, length) and the sampler's distribution."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import token_text

from meshlm import LLM, SamplingParams
from meshlm.engine.sampler import make_generator, sample

KIND = "llama_gqa"
PROMPT = [17, 301, 45, 99, 250, 8]
OTHER = [400, 3, 77]


@pytest.fixture(scope="module")
def model(llm):
    return llm(KIND)


@pytest.fixture(scope="module")
def greedy(model) -> list[int]:
    """24 greedy tokens for PROMPT, checked against teacher-forced argmax of the uncached forward."""
    out = model.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    return out.token_ids


def first_index(tokens: list[int], k: int) -> int:
    """Index of the first occurrence of tokens[k] (a token may repeat earlier)."""
    return tokens.index(tokens[k])


def ordinary_from(tokens: list[int], start: int, run: int = 1) -> int:
    """First index >= start where `run` tokens in a row are ordinary (id >= 3: not <s>, </s>, <unk>)
    and the first of them does not occur earlier."""
    return next(i for i in range(start, len(tokens) - run)
                if all(t >= 3 for t in tokens[i: i + run]) and tokens.index(tokens[i]) == i)


def test_greedy_is_argmax_of_uncached_logits(model, greedy):
    logits = model.logits([PROMPT + greedy[:-1]])[0, len(PROMPT) - 1:]  # [24, V]
    assert logits.argmax(-1).tolist() == greedy
    assert len(set(greedy)) > 8


def test_seed_reproduces_and_different_seeds_differ(model):
    def run(seed):
        p = SamplingParams(max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
        return model.generate(PROMPT, p)[0].token_ids

    first = run(1234)
    assert run(1234) == first
    assert run(1235) != first


def test_seeded_output_does_not_depend_on_batch(model):
    p = SamplingParams(max_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    alone = model.generate(PROMPT, p)[0].token_ids
    other = SamplingParams(max_tokens=5, temperature=1.0, seed=99, ignore_eos=True)
    batched = model.generate([OTHER, PROMPT], [other, p])
    assert batched[1].token_ids == alone
    assert len(batched[0].token_ids) == 5


def test_sampling_without_seed_is_not_greedy(model, greedy):
    p = SamplingParams(max_tokens=24, temperature=2.0, ignore_eos=True)
    assert model.generate(PROMPT, p)[0].token_ids != greedy


@pytest.mark.parametrize("params", [
    dict(temperature=0.0, top_k=50, top_p=0.5, seed=3),
    dict(temperature=1.5, top_k=1, seed=3),
    dict(temperature=1.5, top_p=1e-6, seed=3),
    dict(temperature=1e-4, seed=3),
], ids=["temperature0", "top_k1", "tiny_top_p", "tiny_temperature"])
def test_equivalents_of_greedy(model, greedy, params):
    out = model.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True, **params))[0]
    assert out.token_ids == greedy


def test_stop_string_truncates_text(model, greedy):
    k = ordinary_from(greedy, 6)
    stop = token_text(greedy[k])  # the whole text of a token, e.g. "w123."
    out = model.generate(PROMPT, SamplingParams(max_tokens=24, stop=(stop,)))[0]
    text = model.tokenizer.decode(greedy[: k + 1])
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy[: k + 1]
    assert out.text == text[: text.index(stop)]
    assert stop not in out.text


def test_stop_string_spanning_two_tokens(model, greedy):
    k = ordinary_from(greedy, 4, run=2)
    stop = token_text(greedy[k])[-2:] + " " + token_text(greedy[k + 1])[:2]  # e.g. "7. w1"
    full = model.tokenizer.decode(greedy)
    cut = full.index(stop)
    completing = next(n for n in range(1, len(greedy) + 1)
                      if len(model.tokenizer.decode(greedy[:n])) >= cut + len(stop))
    out = model.generate(PROMPT, SamplingParams(max_tokens=24, stop=[stop]))[0]
    assert out.finish_reason == "stop"
    assert out.text == full[:cut]
    assert out.token_ids == greedy[:completing]  # stops at the token that completes the string


def test_stop_token_ids(model, greedy):
    k = ordinary_from(greedy, 4)
    out = model.generate(PROMPT, SamplingParams(max_tokens=24, stop_token_ids=(greedy[k],)))[0]
    assert out.finish_reason == "stop"
    assert out.token_ids == greedy[: k + 1]
    assert out.text == model.tokenizer.decode(greedy[:k])  # the stop token's text is left out


def test_eos_from_config_stops_unless_ignored(model, greedy, checkpoint, tmp_path):
    folder = tmp_path / "eos"
    shutil.copytree(checkpoint(KIND), folder)
    k = first_index(greedy, 5)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["eos_token_id"] = [greedy[k], 1]
    (folder / "config.json").write_text(json.dumps(cfg))
    eos_llm = LLM(str(folder), progress=False)
    out = eos_llm.generate(PROMPT, SamplingParams(max_tokens=24))[0]
    assert (out.token_ids, out.finish_reason) == (greedy[: k + 1], "stop")
    out = eos_llm.generate(PROMPT, SamplingParams(max_tokens=24, ignore_eos=True))[0]
    assert (out.token_ids, out.finish_reason) == (greedy, "length")


@pytest.mark.parametrize("max_tokens", [1, 7])
def test_max_tokens_gives_length(model, greedy, max_tokens):
    outs = model.generate([PROMPT, OTHER], SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    assert outs[0].token_ids == greedy[:max_tokens]
    for out in outs:
        assert len(out.token_ids) == max_tokens
        assert out.finish_reason == "length"


def test_max_tokens_clipped_by_context(checkpoint, greedy):
    small = LLM(str(checkpoint(KIND)), max_context=16, progress=False)
    out = small.generate(PROMPT, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.token_ids == greedy[: 16 - len(PROMPT)]
    assert out.finish_reason == "length"


# --- the sampler's distribution -------------------------------------------------------------------

LOGITS = torch.tensor([1.3, -0.4, 2.1, 0.2, 1.7, -1.5, 0.9, -0.1])
DRAWS = 10_000


def expected_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """softmax(logits / T), restricted to the top-k tokens, then to the smallest prefix with mass >= top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    if top_k:
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[probs.topk(top_k).indices] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        n = int((sorted_probs.cumsum(0) < top_p).sum()) + 1  # tokens needed to reach top_p
        keep = torch.zeros_like(probs, dtype=torch.bool)
        keep[order[:n]] = True
        probs = torch.where(keep, probs, 0.0)
        probs = probs / probs.sum()
    return probs


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0),
    (0.5, 0, 1.0),
    (2.0, 3, 1.0),
    (1.0, 0, 0.7),
    (1.0, 3, 0.6),  # top-p over the renormalized top-3 (0.47, 0.32, 0.21) keeps 2, not 3
])
def test_sampler_frequencies_follow_the_distribution(temperature, top_k, top_p):
    """Frequencies over 10k draws stay within 5 sigma of the target; excluded tokens never appear."""
    expected = expected_probs(LOGITS, temperature, top_k, top_p)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    gen = make_generator(0)
    counts = torch.bincount(torch.tensor([sample(LOGITS, params, gen) for _ in range(DRAWS)]),
                            minlength=len(LOGITS)).double()
    freq = counts / DRAWS
    sigma = (expected * (1 - expected) / DRAWS).sqrt()
    assert torch.all(counts[expected == 0] == 0), (freq, expected)
    assert torch.all((freq - expected).abs() <= 5 * sigma + 1e-3), (freq, expected)
    if top_k or top_p < 1.0:  # the restriction must bite, or this case tests nothing new
        assert (expected == 0).any()


def test_sampler_greedy_ignores_the_generator():
    gen = make_generator(0)
    assert all(sample(LOGITS, SamplingParams(), gen) == 2 for _ in range(10))
