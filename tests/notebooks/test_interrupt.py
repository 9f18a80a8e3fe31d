"""■ (Kernel > Interrupt) during a cell queued by Run All: the cell shows one line and the queue stops.

A real kernel, driven the way JupyterLab drives it: several execute requests are queued at once with
`stop_on_error=True` (what Run All sends), then the kernel is interrupted while the first one runs. The interrupted
cell must end as an error whose whole output is one line, and the queued cells must be aborted, not run.
"""
from __future__ import annotations

import time

import pytest

jupyter_client = pytest.importorskip("jupyter_client")
pytest.importorskip("ipykernel")

pytestmark = pytest.mark.notebook

SETUP = "import time, types\nfrom unitok_widgets import notebook_setup\nlab = notebook_setup(quiet=True)\nran = []"


@pytest.fixture(scope="module")
def kernel():
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        reply = kc.execute_interactive(SETUP, timeout=120)
        assert reply["content"]["status"] == "ok", reply["content"]
        yield km, kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def _run_all_then_interrupt(km, kc, cells: list[str]) -> tuple[list[dict], list[dict]]:
    """Queue `cells` as Run All does, interrupt while the first runs. -> (replies in order, error messages)."""
    ids = [kc.execute(code, stop_on_error=True) for code in cells]
    deadline = time.monotonic() + 60
    started = False
    while not started and time.monotonic() < deadline:         # wait until the first cell is really running
        msg = kc.get_iopub_msg(timeout=60)
        started = msg["msg_type"] == "stream" and "running" in msg["content"].get("text", "")
    assert started, "the first cell never started"
    time.sleep(1.0)                  # well inside the cell's long call, not in the print that announced it
    km.interrupt_kernel()
    replies = {}
    while len(replies) < len(ids):
        msg = kc.get_shell_msg(timeout=60)
        replies[msg["parent_header"]["msg_id"]] = msg["content"]
    errors = []
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=2)
        except Exception:
            break
        if msg["msg_type"] == "error" and msg["parent_header"]["msg_id"] == ids[0]:
            errors.append(msg["content"])
    return [replies[i] for i in ids], errors


@pytest.mark.parametrize("cell", [
    # a training cell: lab.stoppable names the step where the trainer stopped
    "with lab.stoppable(types.SimpleNamespace(step_count=7)):\n    print('running', flush=True)\n    time.sleep(60)",
    # any other cell (sampling, evaluating): notebook_setup made every interrupt one line
    "print('running', flush=True)\ntime.sleep(60)",
])
def test_interrupt_shows_one_line_and_stops_the_queue(kernel, cell):
    km, kc = kernel
    replies, errors = _run_all_then_interrupt(km, kc, [cell, "ran.append('second')", "ran.append('third')"])
    assert [r["status"] for r in replies] == ["error", "aborted", "aborted"]
    assert len(errors) == 1, errors
    [error] = errors
    assert len(error["traceback"]) == 1, error["traceback"]     # one line, not a screen of traceback
    [line] = error["traceback"]
    assert line.startswith("■ stopped") and "The cells below were not run" in line
    if "step_count=7" in cell:
        assert line.startswith("■ stopped at step 7; the model keeps its weights.")
    check = kc.execute_interactive("assert ran == [], ran", timeout=30)
    assert check["content"]["status"] == "ok", "a queued cell ran after the interrupt"
