"""lazy.py: a module named by a handle is imported at the first read of one of its attributes."""
import sys

import lazy


def test_a_module_is_imported_at_its_first_attribute_read_and_read_through_after(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    handle = lazy.LazyModule("colorsys")
    assert "colorsys" not in sys.modules
    assert handle.rgb_to_hsv(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    real = sys.modules["colorsys"]
    monkeypatch.setattr(real, "ONE_THIRD", 0.5)  # every read goes to the module: a patch is seen
    assert handle.ONE_THIRD == 0.5
    monkeypatch.setattr(handle, "TWO_THIRD", 0.25)  # and a patch through the handle patches the module
    assert real.TWO_THIRD == 0.25
    monkeypatch.undo()
    assert real.TWO_THIRD == 2.0 / 3.0 and handle.TWO_THIRD == 2.0 / 3.0
