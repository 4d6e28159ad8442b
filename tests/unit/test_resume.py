"""An engine request resumed from tokens generated elsewhere (a request moved off a failed replica)."""

from __future__ import annotations

import pytest

from meshlm import SamplingParams
from meshlm.engine.engine import Resume
from meshlm.errors import RequestError

KIND = "llama_gqa"


@pytest.mark.parametrize("cut", [1, 7, 23])
def test_resume_continues_the_greedy_run(llm, cut):
    """Resuming after `cut` tokens yields exactly the rest of the undisturbed run: its tokens (not the ones
    resumed), its whole text, the budget counted from the start, and a stop string spanning the cut."""
    model = llm(KIND)
    engine = model.engine
    prompt = [5, 17, 42, 99, 3, 250]
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    whole = engine.generate([prompt], [params])[0]
    head = model.tokenizer.decode(whole.token_ids[:cut])
    engine.add_request(prompt, params, "resumed", resume=Resume(tuple(whole.token_ids[:cut]), head))
    out = None
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.request_id == "resumed"), out)
    assert out.token_ids == whole.token_ids and out.text == whole.text and out.finish_reason == "length"
    # A stop string made of the last resumed token's text and the next one's still stops the request.
    words = whole.text.split(" ")
    stop = words[cut - 1][-2:] + " " + words[cut][:2]
    params = SamplingParams(max_tokens=24, ignore_eos=True, stop=(stop,))
    engine.add_request(prompt, params, "stops", resume=Resume(tuple(whole.token_ids[:cut]), head))
    while engine.has_unfinished():
        out = next((o for o in engine.step() if o.request_id == "stops"), out)
    assert out.finish_reason == "stop"
    assert out.text == whole.text[:whole.text.find(stop, len(head) - len(stop) + 1)]


def test_resume_without_budget_is_refused(llm):
    """A request that already used its whole budget cannot be resumed."""
    engine = llm(KIND).engine
    with pytest.raises(RequestError, match="no tokens left"):
        engine.add_request([5, 6], SamplingParams(max_tokens=2), "full", resume=Resume((7, 8), "w7. w8."))


def test_progress_counts_layers(llm):
    """engine.progress() (the heartbeat's proof that a step moves) advances by one per decoder layer run."""
    model = llm(KIND)
    before = model.engine.progress()
    model.engine.generate([[5, 6, 7]], [SamplingParams(max_tokens=4, ignore_eos=True)])
    assert model.engine.progress() - before == 4 * model.cfg.num_layers  # a prefill step, then 3 decode steps
