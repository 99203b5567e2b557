"""Suite-wide test settings."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny tensors everywhere: one intra-op thread. On the 2-core CI machine OpenMP spin-waiting made small ops
    up to ~100x slower under load; one thread also keeps timings irrelevant to what the tests assert."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------ figures for the report
_FIGURES: dict[str, str] = {}


@pytest.fixture(scope="session")
def record_figure():
    """``record_figure(name, text)``: a measured figure (e.g. a loss before -> after) that the test run prints in
    its terminal summary, so reports quote what the tests measured instead of a test that only logs."""

    def record(name: str, text: str) -> None:
        _FIGURES[name] = text

    return record


def pytest_terminal_summary(terminalreporter):
    if _FIGURES:
        terminalreporter.section("figures measured by the tests")
        for name, text in sorted(_FIGURES.items()):
            terminalreporter.write_line(f"{name:<32} {text}")
