"""Glue for the libraries people train with; each submodule imports its library only when
used (none of them is a dependency of adampx)."""
