"""Data sets that ship with specialize: `pydocs`, built from the installed standard library."""
