"""Training recipes and their logs; not part of the installed package."""
