"""`python -m scripts.cli ...`: how the services are spawned (same as the `specd` console script)."""
import sys

from scripts.cli import main

sys.exit(main())
