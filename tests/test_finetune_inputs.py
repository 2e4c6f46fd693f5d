"""A training request's fields (finetune/inputs.py): bounded weights and batches, huge numbers as
field errors.

Formerly part of tests/test_hardening.py (issue 14).
"""

from __future__ import annotations

import json

import pytest

from helpers.training import HUGE, LIMITS, SAMPLE
from amygdala.finetune.inputs import Limits, parse_request
from amygdala.fields import FieldError


def test_objective_weights_are_bounded():
    for key, value in (("beta", 1e37), ("beta", 10.5), ("beta", 0), ("orpo_lambda", 11), ("orpo_lambda", -1)):
        with pytest.raises(FieldError) as e:
            parse_request({"samples": [SAMPLE], "config": {"objective": "dpo", key: value}}, LIMITS)
        assert e.value.path == f"config.{key}"
    _, config = parse_request({"samples": [SAMPLE], "config": {"objective": "dpo", "beta": 10, "orpo_lambda": 10}}, LIMITS)
    assert (config.beta, config.orpo_lambda) == (10.0, 10.0)


def test_tokens_per_micro_batch_are_bounded():
    long = {"context_ids": [5] * 500, "continuation_ids": [6] * 12}
    with pytest.raises(FieldError, match=r"17 rows x 512 tokens = 8704, over the limit of 8192 tokens") as e:
        parse_request({"samples": [long] * 17, "config": {"micro_batch": 17}}, LIMITS)
    assert e.value.path == "config.micro_batch"
    parse_request({"samples": [long] * 17, "config": {"micro_batch": 16}}, LIMITS)  # 16 x 512 = 8192: at the limit
    pair = {**long, "rejected_ids": [7] * 12}
    with pytest.raises(FieldError, match="16 rows x 512 tokens"):  # orpo/dpo: preferred and rejected rows
        parse_request({"samples": [pair] * 8, "config": {"objective": "orpo", "micro_batch": 16}}, Limits(1000, 1024, max_batch_tokens=8000))


@pytest.mark.parametrize("field, value", [
    ("config.learning_rate", HUGE), ("config.beta", HUGE), ("config.orpo_lambda", HUGE), ("config.steps", HUGE),
    ("config.micro_batch", HUGE), ("config.learning_rate", -HUGE), ("samples[0].context_ids[1]", HUGE),
    ("samples[0].continuation_ids[0]", -HUGE), ("samples[0].rejected_ids[2]", HUGE),
])
def test_huge_numbers_in_a_training_request_are_field_errors(field, value):
    body = {"samples": [json.loads(json.dumps(SAMPLE))], "config": {"objective": "orpo"}}
    if field.startswith("config."):
        body["config"][field.split(".")[1]] = value
    else:
        key, index = field.split(".")[1].split("[")
        body["samples"][0][key][int(index.rstrip("]"))] = value
    with pytest.raises(FieldError) as e:
        parse_request(body, LIMITS)
    assert e.value.path == field and len(str(e.value)) < 300
