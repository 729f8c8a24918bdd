"""Type aliases every layer spells the same way.

Primitive: imports nothing of lorahub.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeAlias

#: A file-system path, or text that may also name a stored thing (a reference, a repo id).
StrPath: TypeAlias = str | os.PathLike[str]

#: Called as ``progress(done, total)`` in bytes while a long step runs; raising aborts it.
Progress: TypeAlias = Callable[[int, int], None]
