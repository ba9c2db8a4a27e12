"""Where the real Nydus images are: `shared/` is checked out beside the repository (here and in
CI), so the path is relative to this file."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "nydus"
