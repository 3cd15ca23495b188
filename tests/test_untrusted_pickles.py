"""Hostile pickles given as a "DeepMind NFNet checkpoint": every one is refused, none runs code,
none changes the loader (BUILD/SETITEM pollution of the whitelisted builders), and a good
checkpoint still loads afterwards. Payloads are written opcode by opcode (pickletools names)."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from dpft.models import checkpoints as ckpt

NP_CORE = "numpy._core.multiarray" if hasattr(np, "_core") else "numpy.core.multiarray"


def _g(module: str, name: str) -> bytes:
    """GLOBAL opcode (protocol 0-3 style)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _s(text: str) -> bytes:
    """SHORT_BINUNICODE."""
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data


def _call(module: str, name: str, *args: str) -> bytes:
    """GLOBAL module.name, then REDUCE with a tuple of string args."""
    return b"\x80\x02" + _g(module, name) + b"(" + b"".join(_s(a) for a in args) + b"tR."


def _stack_global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 4 STACK_GLOBAL + REDUCE."""
    return b"\x80\x04" + _s(module) + _s(name) + b"\x93" + _s(arg) + b"\x85R."


def _build(target: bytes, state: bytes) -> bytes:
    """Push `target`, push `state`, BUILD, STOP."""
    return b"\x80\x02" + target + state + b"b."


def _slotstate(key: str, value: bytes) -> bytes:
    """(None, {key: value}): BUILD's slot-state form (setattr on the target)."""
    return b"N}" + _s(key) + value + b"s\x86"


CODECS = _g("_codecs", "encode")  # whitelisted builder (a Python function of ours)
FLATMAPPING = _g("haiku._src.data_structures", "FlatMapping")  # whitelisted class (ours)
LOAD_TYPE = _g("dill._dill", "_load_type")
RECONSTRUCT = _g(NP_CORE, "_reconstruct")
NP_DTYPE = _g("numpy", "dtype")


def _payloads(marker: str) -> dict[str, bytes]:
    cmd = f"touch {marker}"
    code = f"open({marker!r}, 'w').write('x')"
    p: dict[str, bytes] = {}
    # -- REDUCE of dangerous globals
    for mod, name, arg in [("builtins", "eval", code), ("builtins", "exec", code), ("os", "system", cmd),
                           ("posix", "system", cmd), ("subprocess", "getoutput", cmd), ("numpy", "load", marker),
                           ("pickle", "loads", "x"), ("builtins", "__import__", "os"), ("builtins", "getattr", "x"),
                           ("builtins", "open", marker), ("importlib", "import_module", "os"),
                           ("copyreg", "_reconstructor", "x"), ("functools", "partial", "x"),
                           ("operator", "attrgetter", "system"), ("operator", "methodcaller", "system"),
                           ("shutil", "rmtree", marker), ("numpy", "frombuffer", "x"), ("runpy", "run_path", marker)]:
        p[f"reduce_{mod}.{name}"] = _call(mod, name, arg)
    # -- the same through STACK_GLOBAL (protocol 4)
    p["stack_global_eval"] = _stack_global_call("builtins", "eval", code)
    p["stack_global_os_system"] = _stack_global_call("os", "system", cmd)

    # -- an object whose __reduce_ex__ calls os.system, pickled by Python itself (protocols 0-5)
    class Evil:
        def __reduce_ex__(self, protocol):
            return (os.system, (cmd,))

    for proto in range(6):
        p[f"reduce_ex_protocol_{proto}"] = pickle.dumps({"NFNet/~/linear": {"w": Evil()}}, protocol=proto)
    # -- protocol-0 INST and protocol-1 OBJ
    p["inst_os_system"] = b"(S'" + cmd.encode() + b"'\nios\nsystem\n."
    p["obj_os_system"] = b"(" + _g("os", "system") + _s(cmd) + b"o."
    # -- persistent id
    p["persistent_id"] = b"\x80\x02" + _s("os.system") + b"Q."
    # -- BUILD / SETITEM / APPEND pollution of the whitelisted builders (no code, but a foothold)
    p["build_defaults_of_codecs_encode"] = _build(CODECS, _slotstate("__defaults__", b"(" + _s("latin1") + b"t"))
    p["build_dict_of_codecs_encode"] = _build(CODECS, b"}" + _s("__kwdefaults__") + b"}s")
    p["build_setstate_of_flatmapping_class"] = _build(FLATMAPPING, _slotstate("__setstate__", CODECS))
    p["build_defaults_of_load_type"] = _build(LOAD_TYPE, _slotstate("__defaults__", b"(" + _s("x") + b"t"))
    p["build_on_numpy_reconstruct"] = _build(RECONSTRUCT, _slotstate("__doc__", _s("x")))
    p["build_on_numpy_dtype_class"] = _build(NP_DTYPE, _slotstate("__doc__", _s("x")))
    p["setitem_on_function"] = b"\x80\x02" + CODECS + _s("__defaults__") + _s("x") + b"s."
    p["setitems_on_class"] = b"\x80\x02" + FLATMAPPING + b"(" + _s("__setstate__") + CODECS + b"u."
    p["append_on_dict"] = b"\x80\x02}" + _s("x") + b"a."
    p["additems_set"] = b"\x80\x04\x8f(" + _s("x") + b"\x90."
    # -- a well-formed tree with one poisoned leaf
    p["nested_reduce_in_tree"] = (b"\x80\x02}" + _s("NFNet/~/linear") + b"}" + _s("w")
                                  + _g("builtins", "eval") + b"(" + _s(code) + b"tRss.")
    return p


def _loader_fingerprint() -> dict:
    funcs = [ckpt._codecs_encode, ckpt._create_array, ckpt._load_type]
    return {
        "defaults": [f.__defaults__ for f in funcs],
        "kwdefaults": [f.__kwdefaults__ for f in funcs],
        "dicts": [dict(f.__dict__) for f in funcs],
        "standin": sorted(vars(ckpt.HaikuMappingStandIn)),
        "standin_setstate": ckpt.HaikuMappingStandIn.__dict__["__setstate__"],
        "dtype_doc": np.dtype.__doc__,
    }


def test_at_least_36_hostile_payloads_are_refused_none_runs_none_pollutes(tmp_path):
    marker = tmp_path / "pwned"
    payloads = _payloads(str(marker))
    assert len(payloads) >= 36
    before = _loader_fingerprint()
    refused = {}
    for name, data in payloads.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        with pytest.raises(ckpt.CheckpointError) as info:
            ckpt.read_checkpoint(path)
        refused[name] = str(info.value)
        assert not marker.exists(), f"payload {name} ran code"
        assert _loader_fingerprint() == before, f"payload {name} changed the loader"
    # BUILD/SETITEM pollution is refused by the opcode check (not by luck elsewhere).
    for name in ("build_defaults_of_codecs_encode", "build_dict_of_codecs_encode",
                 "build_setstate_of_flatmapping_class", "build_defaults_of_load_type"):
        assert "BUILD" in refused[name], refused[name]
    assert "SETITEM" in refused["setitem_on_function"] and "SETITEMS" in refused["setitems_on_class"]
    assert "APPEND" in refused["append_on_dict"]
    assert "forbidden global" in refused["reduce_builtins.eval"]
    # A good checkpoint (nested dicts of arrays, numpy's own pickling) still loads afterwards.
    good = {"NFNet/~/linear": {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, np.float32)}}
    for proto in (2, 4):
        path = tmp_path / f"good{proto}.npz"
        path.write_bytes(pickle.dumps(good, protocol=proto))
        tree = ckpt.read_checkpoint(path)
        np.testing.assert_array_equal(tree["NFNet/~/linear"]["w"], good["NFNet/~/linear"]["w"])


def test_build_pollution_would_have_worked_on_an_unchecked_unpickler(tmp_path):
    """The payload is real: Python's own unpickler, with our whitelist but without the opcode
    checks, sets __defaults__ of the whitelisted builder (so the test above can fail)."""

    class WhitelistOnly(pickle.Unpickler):
        find_class = ckpt.RestrictedUnpickler.find_class

    victim = ckpt._codecs_encode
    saved = victim.__defaults__
    import io
    try:
        WhitelistOnly(io.BytesIO(_payloads("/nonexistent")["build_defaults_of_codecs_encode"])).load()
        assert victim.__defaults__ == ("latin1",)
    finally:
        victim.__defaults__ = saved
