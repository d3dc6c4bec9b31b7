"""Reports: model statistics, run reports, plots and robustness estimates."""

from .robustness import lipschitz, plot_lipschitz

__all__ = ["lipschitz", "plot_lipschitz"]
