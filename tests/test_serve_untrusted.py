"""Request bodies from strangers (issue 24): JSON nested ~1000 deep is a 400 naming the body (or the
field), not a 500. These call the routes' own parse and check functions; no server is started."""

from __future__ import annotations

import pytest

from amygdala.fields import FieldError
from amygdala.finetune import protocol
from amygdala.finetune.inputs import Limits
from amygdala.serve.finetune_routes import _checked_submit, json_body
from amygdala.serve.spec import ModelShape, parse

DEEP = [b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000]


@pytest.mark.parametrize("raw", DEEP)
def test_a_deep_train_body_is_a_field_error_on_body(raw):
    with pytest.raises(FieldError, match="nested too deeply") as e:
        _checked_submit(raw, Limits(vocab_size=100, max_length=64))
    assert e.value.path == "body"


@pytest.mark.parametrize("raw", DEEP)
def test_a_deep_rollback_body_is_a_field_error_on_body(raw):
    with pytest.raises(FieldError, match="nested too deeply") as e:
        json_body(raw, '{"snapshot": "snap-..."}')
    assert e.value.path == "body"


def test_a_deep_steer_string_is_a_field_error_on_steer():
    with pytest.raises(FieldError, match="nested too deeply") as e:
        parse({"steer": "[" * 5000 + "]" * 5000}, None, None, ModelShape(4, 8))
    assert e.value.path == "steer"


def test_the_worker_channel_answers_a_deep_message_as_unknown():
    assert protocol.decode(b"[" * 5000 + b"]" * 5000) is None
