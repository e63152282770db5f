"""The command line of diffusers' reference scripts works unchanged: every flag, type, default, nargs and choices
(tests/upstream-cli.md is a copy of the reference table)."""

import ast
import re
from pathlib import Path

import pytest

import train_text_to_image_decoder as decoder
import train_text_to_image_prior as prior

TABLE = Path(__file__).with_name("upstream-cli.md").read_text()
ROWS = [r for r in TABLE.split("## The reference LoRA scripts")[0].splitlines() if r.startswith("| `--")]


def upstream_flags(script):
    column = 4 if script == "prior" else 5
    for row in ROWS:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        if cells[column] == "yes":
            yield cells


def actions(parser):
    return {a.option_strings[0]: a for a in parser._actions if a.option_strings}


def parser_of(module):
    parser = {}

    def capture(self, *a, **k):
        parser["p"] = self
        raise SystemExit(0)

    import argparse

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            module.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return parser["p"]


@pytest.mark.parametrize("name,module", [("prior", prior), ("decoder", decoder)])
def test_every_reference_flag_has_the_same_type_default_and_shape(name, module):
    ours = actions(parser_of(module))
    checked = 0
    for flag, kind, default, shape, *_ in upstream_flags(name):
        flag = flag.strip("`")
        assert flag in ours, f"{name}: missing {flag}"
        action = ours[flag]
        expected_default = ast.literal_eval(default.strip("`"))
        assert action.default == expected_default, f"{name}: {flag} default {action.default!r} != {expected_default!r}"
        if kind.startswith("flag"):
            assert action.nargs == 0 and action.const is True, f"{name}: {flag} should be store_true"
        else:
            assert action.type.__name__ == kind, f"{name}: {flag} type {action.type} != {kind}"
        if "nargs=+" in shape:
            assert action.nargs == "+"
        match = re.search(r"choices=(.*)", shape)
        if match:
            assert list(action.choices) == [c.strip() for c in match.group(1).split(",")]
        assert action.help and len(action.help) > 10, f"{name}: {flag} has no help"
        checked += 1
    assert checked == {"prior": 42, "decoder": 43}[name]  # every row of the table


@pytest.mark.parametrize("module", [prior, decoder])
def test_lora_script_flags_are_accepted(module):
    args = module.parse_args(["--rank", "8", "--validation_prompt", "a cat", "--dataset_name", "x"])
    assert args.rank == 8 and args.validation_prompts == ["a cat"] and args.num_validation_images == 4
    args = module.parse_args(["--validation_prompts", "a", "b", "--dataset_name", "x"])
    assert args.num_validation_images == 1 and args.lora_alpha == 4


def test_every_flag_has_help():
    for module in (prior, decoder):
        for action in parser_of(module)._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, action.option_strings
