"""specialize: turn a general-purpose causal language model into a specialist, locally."""

__version__ = "0.1.0"
