"""The package version, in a module of its own so code inside lorahub can read it without
importing the package itself."""

__version__ = "0.1.0"
