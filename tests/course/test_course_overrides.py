"""Overrides: the engine calls the learner's function where it calls the reference, validated by signature."""
from __future__ import annotations

import threading

import pytest
import torch

from minillm.course.overrides import OverrideError, active_overrides, dispatch, use_overrides, validate_override
from minillm.layers.norm import RMSNorm, rms_norm


def my_rms_norm(x, weight, eps):
    return torch.zeros_like(x)


def test_dispatch_defaults_to_the_reference():
    assert dispatch("ch01.rms_norm", rms_norm) is rms_norm
    assert active_overrides() == {}


def test_override_reaches_the_engine_layer_and_is_undone():
    norm = RMSNorm(8)
    x = torch.randn(3, 8)
    with use_overrides({"ch01.rms_norm": my_rms_norm}):
        assert dispatch("ch01.rms_norm", rms_norm) is my_rms_norm
        assert torch.equal(norm(x), torch.zeros(3, 8))
    assert not torch.equal(norm(x), torch.zeros(3, 8))
    assert dispatch("ch01.rms_norm", rms_norm) is rms_norm


def test_nested_blocks_restore_the_outer_mapping():
    def other(x, weight, eps):
        return x
    with use_overrides({"ch01.rms_norm": my_rms_norm}):
        with use_overrides({"ch01.rms_norm": other}):
            assert dispatch("ch01.rms_norm", rms_norm) is other
        assert dispatch("ch01.rms_norm", rms_norm) is my_rms_norm


def test_overrides_do_not_leak_into_other_threads():
    seen = []
    with use_overrides({"ch01.rms_norm": my_rms_norm}):
        t = threading.Thread(target=lambda: seen.append(dispatch("ch01.rms_norm", rms_norm)))
        t.start()
        t.join()
    assert seen == [rms_norm]


@pytest.mark.parametrize("fn,match", [
    (lambda x, w, eps: x, r"has parameters \('x', 'w', 'eps'\), expected \('x', 'weight', 'eps'\)"),
    (lambda x, weight: x, "expected"),
    (lambda *args: args[0], "spell out the parameters"),
    ("not callable at all", "must be callable|neither"),
])
def test_wrong_signature_is_a_clear_error(fn, match):
    with pytest.raises((OverrideError, Exception), match=match):
        with use_overrides({"ch01.rms_norm": fn}):
            pass
    assert dispatch("ch01.rms_norm", rms_norm) is rms_norm


def test_unknown_exercise_is_a_clear_error():
    with pytest.raises(OverrideError, match="'ch01.rmsnorm' is not a registered exercise"):
        validate_override("ch01.rmsnorm", my_rms_norm)


def test_an_implementation_name_loads_its_function():
    with use_overrides({"ch01.rms_norm": "solutions"}) as resolved:
        x = torch.randn(2, 8)
        assert torch.allclose(resolved["ch01.rms_norm"](x, torch.ones(8), 1e-6), rms_norm(x, torch.ones(8), 1e-6))


def test_overrides_default_to_the_learners_exercises(tmp_path, monkeypatch, capsys):
    """The bug this guards: the default once picked solutions/, so a wrong answer in exercises/ looked right."""
    from minillm.engine.block_table import slot_mapping
    monkeypatch.delenv("MINILLM_IMPL", raising=False)
    monkeypatch.delenv("MINILLM_FALLBACK", raising=False)
    import minillm.course.impl as impl
    monkeypatch.setattr(impl, "_BANNERS", set())  # the banner prints once per process: start afresh
    with use_overrides({"ch05.slot_mapping": None}) as resolved:  # exercises/: a stub, so the reference + a banner
        assert resolved["ch05.slot_mapping"]([7, 2], 15, 18, 16) == [127, 32, 33]
    assert "ch05.slot_mapping: not attempted yet, using the reference" in capsys.readouterr().err
    (tmp_path / "ch05_paged_kv.py").write_text(
        "def slot_mapping(block_table, start, end, block_size):\n    return list(range(start, end))  # wrong\n")
    monkeypatch.setenv("MINILLM_IMPL", str(tmp_path))
    with use_overrides({"ch05.slot_mapping": None}) as resolved:  # the learner's wrong answer, not the reference
        assert resolved["ch05.slot_mapping"]([7, 2], 15, 18, 16) == [15, 16, 17]
        assert dispatch("ch05.slot_mapping", slot_mapping) is not slot_mapping
