"""QOM-like user-creatable objects (``--object`` / ``object-add``): iothreads."""
