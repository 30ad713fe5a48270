"""Demo and example datasets for omni-engine, as plugins (`data.plugins`).

They live outside the `engine` package and use only its public API (the names each
engine package lists in `__all__`); the engine never imports them. This package's name
does not shadow Hugging Face's `datasets` library.
"""

# The demo corpus's download, registered with the engine (which never downloads itself).
from . import shakespeare  # noqa: E402,F401
