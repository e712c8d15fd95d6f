"""The package's version, in a module of its own so that any module can import it (the
package's ``__init__`` imports nearly every other)."""

__version__ = "0.1.0"
