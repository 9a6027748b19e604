"""Moved to kdtoolkit.backends.ort (alias kept until kdtoolkit/quant imports the new name)."""

from kdtoolkit.backends.ort import make_session, optimize_for_ort, session_for_profile, session_options

__all__ = ["make_session", "optimize_for_ort", "session_for_profile", "session_options"]
