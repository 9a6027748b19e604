"""Teacher loading and the built-in model zoo."""

from kdtoolkit.models.loading import LoadedModel, build_arch, known_archs, load_model

__all__ = ["LoadedModel", "build_arch", "known_archs", "load_model"]
