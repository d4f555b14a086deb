"""Root conftest: applies to nbval runs over notebooks/ as well as to tests/."""
import torch

torch.set_flush_denormal(True)


def pytest_collectstart(collector):
    # nbval: stderr and HTML reprs vary between library versions; never compare them.
    if str(getattr(collector, "fspath", "")).endswith(".ipynb"):
        collector.skip_compare += ("text/html", "application/javascript", "stderr")
