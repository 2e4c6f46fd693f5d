"""One NAME=VALUE parser with one rule set, and one field-error type (amygdala/fields.py)."""

import pytest

from amygdala.fields import FieldError, parse_assignments


def test_numbers_are_finite_and_repeated_names_add_up():
    assert parse_assignments(["calm=2", "sad=-1,calm=0.5"], "--steer") == {"calm": 2.5, "sad": -1.0}
    for bad in ("calm=nan", "calm=inf", "calm=-inf", "calm=1e999"):
        with pytest.raises(FieldError, match=r"^--steer: .*expected a finite number") as e:
            parse_assignments([bad], "--steer")
        assert e.value.path == "--steer"


@pytest.mark.parametrize("item, message", [
    ("calm", "expected NAME=NUMBER, e.g. calm=1"),
    ("=1", "expected NAME=NUMBER"),
    ("calm=lots", "'calm=lots': 'lots' is not a number"),
])
def test_a_malformed_item_names_the_flag_and_the_item(item, message):
    with pytest.raises(FieldError, match=message):
        parse_assignments([item], "--toward")


def test_unsigned_bare_and_string_values():
    with pytest.raises(FieldError, match="expected a finite, non-negative number"):
        parse_assignments(["calm=-1"], "--toward", signed=False)
    assert parse_assignments(["calm", "sad=-0.5"], "--concept", bare=1.0) == {"calm": 1.0, "sad": -0.5}
    assert parse_assignments([" C = 0.1 "], "--method-param", numbers=False) == {"C": "0.1"}
    with pytest.raises(FieldError, match="C is given twice"):
        parse_assignments(["C=1", "C=2"], "--method-param", numbers=False)


def test_every_cli_job_refuses_a_non_finite_weight(capsys):
    """``generate --steer calm=nan`` was accepted while ``teach`` refused it; now both refuse it, before a model loads."""
    from amygdala.cli.main import main

    assert main(["generate", "--readout", "nowhere", "--steer", "calm=nan", "w1"]) == 2
    assert "--steer: 'calm=nan': expected a finite number" in capsys.readouterr().err
    assert main(["dream", "--server", "http://127.0.0.1:9", "--prompts", "nowhere", "--toward", "calm=nan"]) == 2
    assert "--toward: 'calm=nan': expected a finite, non-negative number" in capsys.readouterr().err
