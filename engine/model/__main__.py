"""`python -m engine.model`: convert the configured model once, print or record its fingerprint."""
import sys

from engine.model.loader import main

sys.exit(main())
