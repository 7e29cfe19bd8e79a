"""The protobuf <-> step conversions carry the sampling, grammar and logprob fields both ways."""

import pytest

from shard.pb import shard_pb2 as pb
from shard.server import step_from_pb, step_to_pb
from shard.step import PromptLogprobs, StepOutput, TokenOutput


def test_new_request_fields_reach_the_step():
    sampling = pb.SamplingParams(do_sample=True, presence_penalty=0.5, min_p=0.05, logit_bias={7: -1.5, 3: 2.0})
    request = pb.NewRequest(
        req_id=4,
        token_ids=[1, 2, 3],
        num_scheduled_tokens=3,
        sampling=sampling,
        grammar='{"grammars": []}',
        prompt_logprobs=True,
        prompt_top_n=2,
    )
    (new,) = step_from_pb(pb.StepRequest(step_id=1, new_requests=[request])).new_requests
    assert (new.grammar, new.prompt_logprobs, new.prompt_top_n) == ('{"grammars": []}', True, 2)
    assert new.sampling.presence_penalty == 0.5 and new.sampling.min_p == pytest.approx(0.05)
    assert new.sampling.logit_bias == ((3, 2.0), (7, -1.5))


def test_grammar_completion_and_prompt_top_tokens_reach_the_response():
    out = StepOutput(
        2,
        [TokenOutput(4, 9, -0.5, [(9, -0.5)], grammar_completed=True)],
        10,
        5,
        [PromptLogprobs(4, 1, [-1.0, -2.0], [[(5, -0.25), (6, -1.0)], [(7, -0.5), (8, -2.0)]])],
    )
    response = step_to_pb(out)
    assert response.outputs[0].grammar_completed
    (prompt,) = response.prompt_logprobs
    assert [[(t.token_id, t.logprob) for t in p.top_tokens] for p in prompt.top_tokens] == [
        [(5, -0.25), (6, -1.0)],
        [(7, -0.5), (8, -2.0)],
    ]
