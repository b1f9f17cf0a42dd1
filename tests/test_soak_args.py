"""scripts/soak.py: argument checks that must hold before the (long) soak starts."""

from __future__ import annotations

import pytest

from script_loader import load_script


@pytest.mark.parametrize("argv, message", [
    (["--steps", "4", "--window", "2", "--warmup", "0"], "--warmup must be >= 1"),  # no start memory snapshot
    (["--steps", "4", "--window", "0", "--warmup", "1"], "--window and --warmup must be >= 1"),  # mean of no loss
    (["--steps", "4", "--window", "2", "--warmup", "4"], "larger than --warmup"),
    (["--steps", "3", "--window", "2", "--warmup", "1"], "at least 2 * --window"),
])
def test_bad_arguments_are_refused_before_training(argv: list[str], message: str,
                                                    capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        load_script("scripts/soak.py").parse_args(argv)
    assert message in capsys.readouterr().err


def test_smallest_valid_warmup_is_accepted() -> None:
    args = load_script("scripts/soak.py").parse_args(["--steps", "4", "--window", "2", "--warmup", "1"])
    assert (args.steps, args.window, args.warmup) == (4, 2, 1)
