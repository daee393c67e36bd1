"""pytest plugin of tools/emu/mutants.py (loaded with `-p mutants_plugin`): keeps only the
tests whose `emu_kernel(...)` marker names the mutated file (RATTENTION_EMU_MUTANT_FILE)
and prints `RAN <test id>` for each test that ran, so the report can say what ran."""
import os


def pytest_collection_modifyitems(config, items):
    target = os.environ.get("RATTENTION_EMU_MUTANT_FILE")
    if not target:
        return
    keep, drop = [], []
    for item in items:
        m = item.get_closest_marker("emu_kernel")
        (keep if m is not None and target in m.args else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_logreport(report):
    if report.when == "call":
        print(f"\nRAN {report.nodeid}", flush=True)
