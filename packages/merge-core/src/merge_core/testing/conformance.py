"""Conformance suite for merge adapters: every adapter (merge-core's and a project's own) runs it.

Use from a project's tests::

    from merge_core.testing.conformance import AdapterCase, AdapterConformance

    class TestMyAdapter(AdapterConformance):
        cases = [AdapterCase(name="tiny", build=make_model, inputs=make_inputs, patch=my_patch, num_tokens=17)]

pytest then runs every check below once per case (the class hook ``pytest_generate_tests`` parametrises
``case``, and ``dtype`` for the half-precision check). The ``check_*`` functions can also be called directly.

Checks: r=0 output exactly equals the unpatched model; token counts per layer follow the schedule (as
the tensors had them: ``MergeState.tokens``); ``remove_patch`` restores forward, classes, attributes and
output; backward reaches every parameter the unpatched model's backward reaches, with finite gradients;
fp16/bf16 run; ``torch.compile(fullgraph=True)`` with a fixed r has no graph break and matches eager.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..adapter import MergeState, remove_patch, state_of
from ..schedule import parse_r, tokens_per_layer


@dataclass
class AdapterCase:
    """One model + adapter under test.

    ``build()``: a fresh, unpatched model in eval mode (random weights, no dropout). ``inputs()``: the example
    input, a tensor, a tuple of positional args or a dict of keyword args. ``patch(model)``: applies the
    adapter (returns the model or None). ``num_tokens``: tokens entering the first block; ``protected``:
    tokens never merged (``None``: read from the state). ``r``: the schedule of the merging checks.
    ``expected_tokens(schedule)``: token count leaving each layer (default: ToMe's clamp per layer).
    ``compile_backend``: ``aot_eager`` traces fully through dynamo and AOTAutograd, fast on CPU; use
    ``inductor`` on a GPU. ``compile_marks``: pytest marker names for this case's compile check (e.g. ``slow``).
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], Any]
    patch: Callable[[nn.Module], Any]
    num_tokens: int
    protected: int | None = None
    r: Any = 2
    expected_tokens: Callable[[list[int]], list[int]] | None = None
    dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16)
    compile_backend: str = "aot_eager"
    run_compile: bool = True
    compile_marks: Sequence[str] = ()
    atol: float = 1e-5
    extra: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


# ---------------------------------------------------------------------------------------------- helpers
def tensors(out: Any) -> list[torch.Tensor]:
    """All tensors of a model output (tensor, tuple/list, dict or a Hugging Face ``ModelOutput``), in order."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping) or hasattr(out, "to_tuple"):
        return [t for value in out.values() for t in tensors(value)]
    if isinstance(out, (tuple, list)):
        return [t for value in out for t in tensors(value)]
    return []


def run(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    """Call ``model`` on ``inputs`` (tensor / tuple of args / dict of kwargs) and return its tensors."""
    if isinstance(inputs, Mapping):
        out = model(**inputs)
    elif isinstance(inputs, tuple):
        out = model(*inputs)
    else:
        out = model(inputs)
    return tensors(out)


def _cast(inputs: Any, dtype: torch.dtype) -> Any:
    if isinstance(inputs, torch.Tensor):
        return inputs.to(dtype) if inputs.is_floating_point() else inputs
    if isinstance(inputs, Mapping):
        return {k: _cast(v, dtype) for k, v in inputs.items()}
    if isinstance(inputs, tuple):
        return tuple(_cast(v, dtype) for v in inputs)
    return inputs


def _patched(case: AdapterCase, model: nn.Module | None = None) -> tuple[nn.Module, MergeState]:
    model = case.build() if model is None else model
    result = case.patch(model)
    model = model if result is None else result
    return model, state_of(model)


def expected_tokens(case: AdapterCase, state: MergeState) -> list[int]:
    """Token count leaving each layer: ToMe removes min(r, half the unprotected tokens) per layer."""
    schedule = parse_r(len(state.r), case.r)
    if case.expected_tokens is not None:
        return list(case.expected_tokens(schedule))
    protected = state.protected if case.protected is None else case.protected
    return tokens_per_layer(case.num_tokens, schedule, protected)


def _snapshot(model: nn.Module) -> dict[str, tuple[type, frozenset[str]]]:
    return {name: (type(m), frozenset(m.__dict__)) for name, m in model.named_modules()}


# ---------------------------------------------------------------------------------------------- checks
def check_r0_exact(case: AdapterCase) -> None:
    """At r=0 the patched model returns exactly (bitwise) what the unpatched model returns."""
    model = case.build()
    inputs = case.inputs()
    with torch.no_grad():
        expected = run(model, inputs)
        model, _ = _patched(case, model)
        model.r = 0
        got = run(model, inputs)
    assert len(got) == len(expected), f"{case.name}: {len(got)} output tensors, unpatched gave {len(expected)}"
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.shape == b.shape and torch.equal(a, b), f"{case.name}: output {i} differs from unpatched at r=0"


def check_token_counts(case: AdapterCase) -> None:
    """With r > 0, the tokens leaving each layer are the schedule's counts, and outputs are finite."""
    model, state = _patched(case)
    model.r = case.r
    with torch.no_grad():
        outs = run(model, case.inputs())
    assert all(torch.isfinite(t).all() for t in outs if t.is_floating_point()), f"{case.name}: non-finite output"
    want = expected_tokens(case, state)
    assert state.tokens == want, f"{case.name}: tokens per layer {state.tokens}, schedule gives {want}"
    assert want[-1] < case.num_tokens, f"{case.name}: r={case.r!r} merges nothing; pick a larger r"
    if state.size is not None:
        assert state.size.shape[-2] == want[-1], f"{case.name}: size has {state.size.shape[-2]} tokens"


def check_remove_patch(case: AdapterCase) -> None:
    """``remove_patch`` restores every class, forward and attribute, and the unpatched output."""
    model = case.build()
    inputs = case.inputs()
    before = _snapshot(model)
    forward = type(model).forward
    with torch.no_grad():
        expected = run(model, inputs)
        model, _ = _patched(case, model)
        model.r = case.r
        run(model, inputs)  # creates any per-module caches
        remove_patch(model)
        after = _snapshot(model)
        got = run(model, inputs)
    changed = [name or "<root>" for name in before if before[name] != after.get(name)]
    assert not changed, f"{case.name}: remove_patch left modules changed: {changed[:5]}"
    assert type(model).forward is forward, f"{case.name}: forward not restored"
    assert not hasattr(model, "_merge_info") and not hasattr(model, "_tome_info")
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert torch.equal(a, b), f"{case.name}: output {i} differs after remove_patch"


def _grads(model: nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss = sum(t.float().square().mean() for t in run(model, inputs) if t.is_floating_point())
    loss.backward()
    return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


def check_backward(case: AdapterCase) -> None:
    """With r > 0, every parameter the unpatched model trains gets a finite gradient."""
    model = case.build()
    inputs = case.inputs()
    reached = set(_grads(model, inputs))
    model, _ = _patched(case, model)
    model.r = case.r
    grads = _grads(model, inputs)
    missing = sorted(reached - set(grads))
    assert not missing, f"{case.name}: no gradient with merging for {missing[:5]}"
    bad = [name for name, g in grads.items() if not torch.isfinite(g).all()]
    assert not bad, f"{case.name}: non-finite gradients for {bad[:5]}"


def check_dtype(case: AdapterCase, dtype: torch.dtype) -> None:
    """The patched model runs in ``dtype`` with r > 0: outputs keep the dtype and are finite."""
    model = case.build().to(dtype)
    model, state = _patched(case, model)
    model.r = case.r
    with torch.no_grad():
        outs = run(model, _cast(case.inputs(), dtype))
    floats = [t for t in outs if t.is_floating_point()]
    assert floats and all(t.dtype == dtype for t in floats), f"{case.name}: outputs not {dtype}"
    assert all(torch.isfinite(t).all() for t in floats), f"{case.name}: non-finite {dtype} output"
    assert state.tokens == expected_tokens(case, state)


def check_compile(case: AdapterCase) -> None:
    """``torch.compile(fullgraph=True)`` with a fixed r traces without a graph break and matches eager."""
    import torch._dynamo

    model, state = _patched(case)
    model.r = case.r
    inputs = case.inputs()
    with torch.no_grad():
        eager = run(model, inputs)
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=case.compile_backend, fullgraph=True)
        got = run(compiled, inputs)
    assert state.tokens == expected_tokens(case, state)
    for i, (a, b) in enumerate(zip(got, eager, strict=True)):
        torch.testing.assert_close(a, b, atol=case.atol, rtol=case.atol, msg=lambda m, i=i: f"{case.name}[{i}]: {m}")


# ---------------------------------------------------------------------------------------------- pytest base
class AdapterConformance:
    """Subclass as ``TestSomething`` with ``cases = [AdapterCase(...), ...]``; pytest runs every check per case."""

    cases: Sequence[AdapterCase] = ()

    def pytest_generate_tests(self, metafunc) -> None:
        if "case" in metafunc.fixturenames:
            if "dtype" in metafunc.fixturenames:
                pairs = [(c, d) for c in self.cases for d in c.dtypes]
                ids = [f"{c.name}-{str(d).replace('torch.', '')}" for c, d in pairs]
                metafunc.parametrize(("case", "dtype"), pairs, ids=ids)
            else:
                cases: list[Any] = list(self.cases)
                if metafunc.function.__name__ == "test_compile_fullgraph":
                    import pytest  # only reached under pytest

                    cases = [
                        pytest.param(c, marks=[getattr(pytest.mark, m) for m in c.compile_marks], id=c.name)
                        for c in cases
                        if c.run_compile
                    ]
                    metafunc.parametrize("case", cases)
                    return
                metafunc.parametrize("case", cases, ids=[c.name for c in cases])

    def test_r0_exact(self, case: AdapterCase) -> None:
        check_r0_exact(case)

    def test_token_counts(self, case: AdapterCase) -> None:
        check_token_counts(case)

    def test_remove_patch(self, case: AdapterCase) -> None:
        check_remove_patch(case)

    def test_backward(self, case: AdapterCase) -> None:
        check_backward(case)

    def test_half_precision(self, case: AdapterCase, dtype: torch.dtype) -> None:
        check_dtype(case, dtype)

    def test_compile_fullgraph(self, case: AdapterCase) -> None:
        check_compile(case)


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy, for cases that build once and hand out copies."""
    return copy.deepcopy(model)


__all__ = [
    "AdapterCase",
    "AdapterConformance",
    "check_backward",
    "check_compile",
    "check_dtype",
    "check_r0_exact",
    "check_remove_patch",
    "check_token_counts",
    "copy_model",
    "expected_tokens",
    "run",
    "tensors",
]
