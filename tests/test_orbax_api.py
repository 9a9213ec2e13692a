"""checkpoint.py on Orbax's current API: no option or argument its docstrings mark deprecated, no
deprecation warning or event while saving, reading the metadata and restoring, and the retention
the deprecated max_to_keep gave (the newest keep_checkpoints steps)."""

import dataclasses
import inspect
import re
import warnings

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp

from ddpm_jax.training import checkpoint


def _deprecated_names(doc: str) -> set[str]:
    """The arguments a docstring describes as deprecated ("name: deprecated, do not use ..." or
    "name:\\n    Optional. Deprecated; ...")."""
    return set(re.findall(r"^\s*(\w+):\s*(?:Optional\.\s*)?deprecated\b", doc, flags=re.M | re.I))


@flax.struct.dataclass
class _State:
    step: np.ndarray
    params: dict


def _state(step: int) -> _State:
    return _State(np.int32(step), {"w": np.arange(6, dtype=np.float32).reshape(2, 3) * step})


def test_docstring_parser_finds_what_orbax_marks():
    names = _deprecated_names(ocp.CheckpointManagerOptions.__doc__)
    assert {"max_to_keep", "keep_period", "temporary_path_class"} <= names
    assert "preservation_policy" not in names and "create" not in names
    assert {"item_handlers", "item_names", "checkpointers"} <= _deprecated_names(ocp.CheckpointManager.__init__.__doc__)


def test_no_deprecated_options_warnings_or_events(tmp_path, monkeypatch):
    given, events = [], []
    init = ocp.CheckpointManager.__init__
    deprecated_args = _deprecated_names(init.__doc__)

    def spy(self, directory, *args, **kwargs):
        given.append(inspect.signature(init).bind(self, directory, *args, **kwargs).arguments)
        init(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "__init__", spy)
    monkeypatch.setattr(ocp.CheckpointManager, "item_metadata", lambda *a: (_ for _ in ()).throw(AssertionError()))
    listen = lambda name, **kw: events.append(name)
    jax.monitoring.register_event_listener(listen)
    workdir = str(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            mngr = checkpoint.make_manager(workdir, max_to_keep=2)
            for step in (1, 2, 3):
                assert checkpoint.save(mngr, _state(step))
            checkpoint.wait_until_finished(mngr)
            reader = checkpoint.make_manager(workdir, read_only=True)
            restored = checkpoint.restore_latest(reader, _state(0))
    finally:
        jax.monitoring.unregister_event_listener(listen)
    assert sorted(mngr.all_steps()) == [2, 3]  # the newest two, as max_to_keep=2 kept
    assert int(restored.step) == 3
    np.testing.assert_array_equal(restored.params["w"], np.arange(6).reshape(2, 3) * 3.0)
    assert "/jax/orbax/checkpoint_manager/init" in events and not [e for e in events if "deprecat" in e]

    deprecated_options = _deprecated_names(ocp.CheckpointManagerOptions.__doc__)
    defaults = {f.name: f.default for f in dataclasses.fields(ocp.CheckpointManagerOptions)}
    assert len(given) == 2
    for arguments in given:
        assert not deprecated_args & {k for k, v in arguments.items() if v is not None}
        options = arguments["options"]
        assert {n: getattr(options, n) for n in deprecated_options} == {n: defaults[n] for n in deprecated_options}
