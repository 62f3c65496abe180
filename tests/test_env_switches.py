"""The variables that choose the kernels, SYNCSN_NATIVE and SYNCSN_BACKEND: the spellings they
accept, and a clear error, naming the variable, the value and the spellings, for the rest."""

from __future__ import annotations

import re

import pytest
import torch

import syncsn
from syncsn import _native, kernels


@pytest.fixture(autouse=True)
def unset(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    monkeypatch.delenv("SYNCSN_NATIVE", raising=False)
    monkeypatch.delenv("SYNCSN_BACKEND", raising=False)
    return monkeypatch


@pytest.mark.parametrize("value", ["0", "false", "False", "no", "NO", "off", " Off "])
def test_false_spellings_turn_the_kernels_off(unset, value: str) -> None:
    unset.setenv("SYNCSN_NATIVE", value)
    assert _native.enabled() is False
    assert _native.kernels() is None
    assert kernels.requested() == "torch"


@pytest.mark.parametrize("value", ["", "1", "true", "TRUE", "yes", "Yes", "on", " ON "])
def test_true_spellings_keep_them(unset, value: str) -> None:
    unset.setenv("SYNCSN_NATIVE", value)
    assert _native.enabled() is True
    assert kernels.requested() == "auto"


@pytest.mark.parametrize("value", ["2", "maybe", "nope", "0.0", "disable", "-1"])
def test_other_values_are_refused_naming_the_spellings(unset, value: str) -> None:
    unset.setenv("SYNCSN_NATIVE", value)
    message = rf"SYNCSN_NATIVE={re.escape(repr(value))}.*0, false, no, off.*1, true, yes, on"
    with pytest.raises(ValueError, match=message):
        _native.enabled()
    with pytest.raises(ValueError, match=message):
        kernels.requested()
    # Where a user meets it: the first layer call.
    with pytest.raises(ValueError, match=message):
        syncsn.SwitchNorm2d(3)(torch.randn(2, 3, 4, 4))
    # Also where SYNCSN_BACKEND decides the backend: a typo is never ignored.
    unset.setenv("SYNCSN_BACKEND", "torch")
    with pytest.raises(ValueError, match=message):
        kernels.requested()


@pytest.mark.parametrize(
    "value, name",
    [("torch", "torch"), ("Torch", "torch"), (" CPP ", "cpp"), ("AUTO", "auto"), ("", "auto")],
)
def test_backend_names_are_case_insensitive(unset, value: str, name: str) -> None:
    unset.setenv("SYNCSN_BACKEND", value)
    assert kernels.requested() == name


@pytest.mark.parametrize("value", ["numpy", "c++", "0", "reference"])
def test_an_unknown_backend_is_refused_naming_the_choices(unset, value: str) -> None:
    unset.setenv("SYNCSN_BACKEND", value)
    message = rf"SYNCSN_BACKEND={re.escape(repr(value))} is not a backend.*auto, torch, cpp, triton"
    with pytest.raises(ValueError, match=message):
        kernels.requested()
    with pytest.raises(ValueError, match=message):
        syncsn.SwitchNorm2d(3)(torch.randn(2, 3, 4, 4))
