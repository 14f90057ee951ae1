"""``python -m growthhub_sandbox``: same as the ``growthhub-sandbox`` console script."""

from __future__ import annotations

from growthhub_sandbox.cli import main

if __name__ == "__main__":
    main()
