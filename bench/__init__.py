"""softjax benchmarks: ``python -m bench`` (see ``python -m bench --help``)."""
